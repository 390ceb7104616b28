# One image for the four services. compose.yaml runs one service per container through `command:`;
# `docker run` without a command serves the whole stack in one container (SQLite in /data).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first: the largest layer, reused while the rest changes.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app

# Runtime dependencies from pyproject.toml (no test extras), plus the PostgreSQL driver that the
# postgresql+psycopg database URLs need. A layer of its own: source edits don't reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "psycopg[binary]>=3.1" \
    && rm /tmp/requirements.txt

# The project itself: generate the gRPC code from protos/ into rlhf/, then install the packages.
COPY . .
RUN python scripts/gen_protos.py \
    && pip install --no-deps . \
    && rm -rf build *.egg-info

# Not root. The mount points exist and belong to the service user, so new named volumes do too.
RUN useradd --create-home --uid 10001 --user-group rlhf \
    && mkdir -p /data /artifacts /models \
    && chown rlhf:rlhf /data /artifacts /models
USER rlhf

ENV RLHF_HOST=0.0.0.0 \
    RLHF_DATA_DIR=/data \
    RLHF_ARTIFACT_ROOT=/artifacts \
    RLHF_MODEL_CACHE=/models \
    HF_HOME=/models/huggingface

EXPOSE 50051 50052 50053 50054
CMD ["rlhf", "serve", "all", "--host", "0.0.0.0"]

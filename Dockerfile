# One image for the four services and the REST gateway. compose.yaml runs one service per container through
# `command:`; `docker run` without a command serves the whole stack in one container (SQLite in /data).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first: the largest layer, reused while the rest changes. Its dependencies come
# from requirements.lock with the others.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --no-deps

WORKDIR /app

# Every other package at its version in requirements.lock: the client dependencies and the server extra,
# the PostgreSQL driver that the postgresql+psycopg database URLs need (postgres extra) and grpcio-tools
# for the code generation below (build extra); no test extras. A layer of its own: source edits don't
# reinstall them.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p['optional-dependencies']; \
print('\n'.join(p['dependencies'] + extras['server'] + extras['postgres'] + extras['build']))" > /tmp/requirements.txt \
    && pip install -c requirements.lock -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself: generate the gRPC code from protos/ into rlhf/, drop the generator (not needed at
# run time), then install the packages.
COPY . .
RUN python scripts/gen_protos.py \
    && pip uninstall --yes grpcio-tools \
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

# The four gRPC services, and the REST gateway (the seed's HTTP API).
EXPOSE 50051 50052 50053 50054 8000
CMD ["rlhf", "serve", "all", "--host", "0.0.0.0"]

# The project's commands. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
GENERATED := rlhf/.generated
PROTOS := $(shell find protos -name '*.proto')
# Every version that `make install` and the Dockerfile install (a pip constraints file; `make lock` writes it).
LOCK := requirements.lock
LOCK_PYTHON := 3.11
UV_VERSION := 0.13.9
# Where `make lock` finds the CPU build of torch, so that torch's dependencies are locked for it and no
# CUDA packages are: /opt/wheels on the project's machines; elsewhere e.g.
# `make lock TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu/torch/`.
TORCH_FIND_LINKS ?= /opt/wheels

.PHONY: install lock demo test bench bench-trl bench-trl-venv lint format lint-protos breaking-protos serve clean

install: $(INSTALLED) $(GENERATED)

# torch first, on its own: pip then keeps the installed CPU build (2.13.0+cpu satisfies torch==2.13.0).
# The lock is for CPython $(LOCK_PYTHON) (CI, the Docker image); another Python installs without it.
$(INSTALLED): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@set -e; constraints="-c $(LOCK)"; \
	if [ "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$(LOCK_PYTHON)" ]; then \
	  echo "NOTE: $(LOCK) is for Python $(LOCK_PYTHON); installing without it"; constraints=""; fi; \
	set -x; \
	$(BIN)/python -m pip install --quiet $$constraints torch==2.13.0; \
	$(BIN)/python -m pip install --quiet $$constraints -e '.[server,build,test]'
	touch $(INSTALLED)

# Regenerates $(LOCK) from pyproject.toml (client dependencies plus the server, build, postgres and test extras)
# after a dependency changes there. Keeps the versions already locked where they still fit; UPGRADE=1
# moves every package to its newest allowed release. The command:
#   uv pip compile pyproject.toml --extra server --extra build --extra postgres --extra test --no-emit-package torch \
#     --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_FIND_LINKS) \
#     --custom-compile-command "make lock" -o requirements.lock
# torch is left out: pyproject.toml pins it exactly, and `make install` / the Dockerfile install the CPU
# build before anything else.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra server --extra build --extra postgres --extra test --no-emit-package torch \
	  --python-version $(LOCK_PYTHON) --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_FIND_LINKS) \
	  --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) -o $(LOCK)

$(GENERATED): $(INSTALLED) $(PROTOS) scripts/gen_protos.py
	$(BIN)/python scripts/gen_protos.py
	touch $(GENERATED)

demo: install
	$(BIN)/rlhf demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	@set -e; for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

# TRL 1.12.0 in its own environment, for bench/bench_ppo_vs_trl.py only (it runs TRL in a subprocess with
# this interpreter; the project never imports TRL). torch first, as in `make install`, so the CPU build stays.
TRL_VENV := bench/.trl-venv
$(TRL_VENV)/.installed:
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(TRL_VENV)/bin/python -m pip install --quiet trl==1.12.0 peft
	touch $@

bench-trl-venv: $(TRL_VENV)/.installed

# Our PPO against TRL's PPOTrainer (tiny model and a 124M model; ~15 min on 2 CPU cores). QUICK=1: tiny only.
bench-trl: install bench-trl-venv
	$(BIN)/python bench/bench_ppo_vs_trl.py $(if $(QUICK),--quick)

serve: install
	$(BIN)/rlhf serve all

# Python lint and format check (ruff, configured in pyproject.toml), as CI runs them.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Applies ruff's safe fixes, then formats. What cannot be fixed automatically is left for `make lint`.
format: install
	$(BIN)/ruff check --fix --exit-zero .
	$(BIN)/ruff format .

lint-protos: install
	$(BIN)/buf lint

# Fails if the contracts break compatibility with the committed baseline (.ci/buf-baseline.binpb).
breaking-protos: install
	$(BIN)/buf breaking --against .ci/buf-baseline.binpb

clean:
	rm -rf $(VENV) .rlhf $(GENERATED) rlhf/feedback rlhf/reward rlhf/policy rlhf/inference

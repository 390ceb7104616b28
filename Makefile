# The project's commands. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
GENERATED := rlhf/.generated
PROTOS := $(shell find protos -name '*.proto')

.PHONY: install demo test bench lint-protos breaking-protos serve clean

install: $(INSTALLED) $(GENERATED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(INSTALLED)

$(GENERATED): $(INSTALLED) $(PROTOS) scripts/gen_protos.py
	$(BIN)/python scripts/gen_protos.py
	touch $(GENERATED)

demo: install
	$(BIN)/rlhf demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	@set -e; for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

serve: install
	$(BIN)/rlhf serve all

lint-protos: install
	$(BIN)/buf lint

# Fails if the contracts break compatibility with the committed baseline (.ci/buf-baseline.binpb).
breaking-protos: install
	$(BIN)/buf breaking --against .ci/buf-baseline.binpb

clean:
	rm -rf $(VENV) .rlhf $(GENERATED) rlhf/feedback rlhf/reward rlhf/policy rlhf/inference

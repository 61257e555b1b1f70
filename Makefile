# meshlet: `make demo` runs a local mesh, `make test` runs every check. Both set up .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# the install compiles these with mypyc (setup.py): a change to one rebuilds it
COMPILED_SOURCES := setup.py $(shell find sidecar -name '*.py')

.PHONY: test check lint typecheck imports pytest pytest-pure demo bench clean

$(STAMP): pyproject.toml $(COMPILED_SOURCES)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "meshlet needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,redis]'
	touch $(STAMP)

test: $(STAMP)
	./.ci/system-deps
	$(MAKE) check

check: lint typecheck imports pytest pytest-pure

lint:
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy

imports:
	$(BIN)/lint-imports

pytest:
	@$(BIN)/python -c 'import sidecar; print("sidecar:", sidecar.__build__)'
	$(BIN)/pytest -q

# the sidecar's unit tests once more on its Python source, where it runs compiled
pytest-pure:
	@if $(BIN)/python -c 'import sidecar, sys; sys.exit(not sidecar.__compiled__)'; then \
	    echo MESHLET_PURE=1 $(BIN)/pytest -q -m "'not slow'" tests/sidecar; \
	    MESHLET_PURE=1 $(BIN)/pytest -q -m 'not slow' tests/sidecar; \
	else echo "sidecar: pure Python already tested"; fi

demo: $(STAMP)
	$(BIN)/meshlet demo

bench: $(STAMP)
	@for b in tests/benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info build
	find . -name '*.so' -not -path './.venv/*' -delete

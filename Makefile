# Two entry points: `make demo` (set up, fetch, quantize SmolLM2-135M, print the table) and `make test`.
# jaxquant needs Python 3.12 (JAX 0.11.2, the version the GPU machines run). PYTHON=... overrides the search.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-py312

# The first Python 3.12 found: python3.12 on PATH (a pyenv shim counts only if it runs), then pyenv's own.
FIND_PYTHON := for p in python3.12 "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
  /usr/local/bin/python3.12 /usr/bin/python3.12; do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v "$$p" || echo "$$p"; } && break; \
  done
PYTHON ?= $(shell $(FIND_PYTHON))

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "jaxquant needs Python 3.12 and none was found: install it (e.g. 'pyenv install 3.12' or your OS's python3.12 package), or run make PYTHON=/path/to/python3.12"; exit 1; }
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then \
	  echo "$(VENV) was made with another Python; recreating it with $(PYTHON)"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3"
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) -m jaxquant.cli demo

# Two workers, one test file each (module fixtures load once): on the 2-core CI machine the suite takes about
# half the time of one process, whose Python-bound tracing and interpret-mode kernels leave a core idle.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

test-all: setup
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) .jax_cache

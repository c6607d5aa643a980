# The two commands of the README: `make demo` (set up + run the demo) and `make test` (set up + run the tests).
PY := .venv/bin/python
STAMP := .venv/.setup-stamp

.PHONY: setup demo test lint bench

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m hf_pelrp.demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	.venv/bin/ruff check src tests scripts
	.venv/bin/ruff format --check src tests scripts

bench: $(STAMP)
	$(PY) scripts/bench_attribution.py

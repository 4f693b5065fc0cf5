VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp

.PHONY: venv test lint demo bench fuzz

venv: $(STAMP)

# Re-install only when the dependency lists change; the stamp records the last good install.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -e .
	touch $@

test: venv
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

demo: venv
	$(VENV)/bin/raysight demo

# The property-based fuzz of request bodies and IR with many more examples than `make test` runs.
fuzz: venv
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_fuzz_ir.py --hypothesis-show-statistics

bench: venv
	$(PY) bench/run_all.py

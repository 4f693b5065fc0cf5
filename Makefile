VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp

.PHONY: venv test lint demo bench fuzz soak

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

# The property-based fuzz of request bodies and IR, and the schemathesis run of the OpenAPI app,
# with many more examples than `make test` runs.
SCHEMATHESIS_EXAMPLES ?= 300
fuzz: venv
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_fuzz_ir.py --hypothesis-show-statistics
	SCHEMATHESIS_EXAMPLES=$(SCHEMATHESIS_EXAMPLES) $(PY) -m pytest tests/test_openapi_fuzz.py

# A bounded soak of its own local cluster (mixed load, cancels, time limits, kill -9 of each
# service process); writes soak_* into bench/results.json. E.g. SOAK_ARGS="--steady-s 600 --fault-s 600".
SOAK_ARGS ?=
soak: venv
	$(PY) bench/soak.py $(SOAK_ARGS)

bench: venv
	$(PY) bench/run_all.py

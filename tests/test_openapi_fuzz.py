"""Schemathesis against the served OpenAPI schema: the real app over real HTTP (the session
cluster), with a valid API key so cases reach past 401. Every generated case, valid or not by
the schema, must get no 5xx and a response that conforms to the schema (status code, content
type, headers, body).

Bounded for `make test` (a few hundred cases in all); `make fuzz` runs many more
(SCHEMATHESIS_EXAMPLES). Driven through hypothesis directly: schemathesis's pytest loader
(`from_fixture`) does not work with pytest 9.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))  # per operation and mode
# A request body is a safetensors file holding an IR: JSON Schema cannot say what a valid one
# is, so "schema-valid bytes must be accepted" does not apply to it (tests/test_fuzz_ir.py fuzzes
# real bodies). Every other check still runs on it.
SKIP = {"POST /v1/requests": [positive_data_acceptance]}


@pytest.fixture(scope="module")
def operations(cluster) -> dict[str, schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_the_schema_lists_every_route(operations) -> None:
    assert set(operations) == {
        "GET /healthz", "GET /readyz", "GET /v1/models", "GET /v1/models/{name}",
        "POST /v1/requests", "GET /v1/requests/{request_id}", "GET /v1/requests/{request_id}/events",
        "GET /v1/requests/{request_id}/result", "DELETE /v1/requests/{request_id}",
    }


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_every_route_conforms_and_never_5xx(operations, cluster, mode) -> None:
    headers = {"Authorization": f"Bearer {cluster.keys['alice']}"}
    fuzzed = []
    for name, op in operations.items():
        run = _fuzz(op, mode, headers, SKIP.get(name))
        try:
            run()
        except Unsatisfiable:
            # a route with no parameters and no body has no invalid form (e.g. GET /healthz)
            assert mode is GenerationMode.NEGATIVE, name
            continue
        except Exception as exc:
            raise AssertionError(f"{name} ({mode.value}): {exc}") from exc
        fuzzed.append(name)
    # every route with a parameter, header or body had invalid cases too
    assert len(fuzzed) >= (9 if mode is GenerationMode.POSITIVE else 6), fuzzed


def _fuzz(op: schemathesis.APIOperation, mode: GenerationMode, headers: dict, skip: list | None):
    """A hypothesis test of `op`'s cases in `mode`, each called over HTTP and validated."""

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        case.call_and_validate(headers=headers, timeout=30, excluded_checks=skip)

    return run

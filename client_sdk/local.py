"""Local execution: the session runs in this process with the shared engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from intervention.module_tree import module_paths
from intervention.session import run_session
from intervention.validate import validate_session

if TYPE_CHECKING:
    from client_sdk.tracing import Graph


def run(graph: Graph) -> dict[int, Any]:
    """Validate and execute the graph's session; return saved values by node id."""
    session = graph.session_ir()
    used = {t.model for t in session.traces}
    paths = {name: set(module_paths(graph.models[name].module_tree)) for name in used}
    validate_session(session, graph.tensors, paths)

    def load(name: str):
        model = graph.models[name]
        return model.local_module, model.tokenizer

    outcome = run_session(session, graph.tensors, load, on_log=lambda m: print(m, flush=True))
    return outcome.saves

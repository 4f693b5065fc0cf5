"""Local execution: the session runs in this process with the shared engine."""

from __future__ import annotations

import sys
import weakref
from typing import Any

from client_sdk.graph import Graph
from client_sdk.proxy import TracingError
from intervention.module_tree import module_paths
from intervention.plan import plan_session
from intervention.session import run_session
from intervention.validate import validate_session

# model -> (its module tree, the set of its module paths). Walking the tree costs more than
# running a small trace's engine, and a model's tree never changes, so walk it once per model.
_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LocalBackend:
    remote = False

    def run(self, graph: Graph) -> dict[int, Any]:
        """Validate and execute the graph's session; return saved values by node id."""
        session = graph.session_ir()
        used = {t.model for t in session.traces}
        for name in used:
            model = graph.models[name]
            if not model.is_local:
                raise TracingError(
                    f"'{model.name}' is not a local model folder, so it cannot run locally: pass "
                    "remote=True to run it on the raysight server",
                    next(t.loc for t in session.traces if t.model == name),
                )
        paths = {name: _module_paths(graph.models[name]) for name in used}
        orders = {name: graph.models[name].module_order for name in used}
        # The cap on generation length protects a shared server; locally the user's machine is theirs.
        caps = dict.fromkeys(used, sys.maxsize)
        recordings = graph.recordings or {}
        checked = {id(t): rec.disorder for t in session.traces
                   if (rec := recordings.get(id(t))) is not None and rec.order_checked}
        validate_session(session, graph.tensors, paths, orders=orders, recorded=True, max_new_tokens=caps,
                         order_checked=checked)

        def load(name: str):
            model = graph.models[name]
            return model.local_module, model.tokenizer

        outcome = run_session(
            plan_session(session), graph.tensors, load, on_log=lambda m: print(m, flush=True),
            recorded=graph.recordings,
        )
        if outcome.error is not None:
            raise outcome.error
        return outcome.saves


def _module_paths(model: Any) -> set[str]:
    tree = model.module_tree
    cached = _PATHS.get(model)
    if cached is None or cached[0] is not tree:
        cached = _PATHS[model] = (tree, set(module_paths(tree)))
    return cached[1]

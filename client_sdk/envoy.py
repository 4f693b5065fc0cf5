"""Envoys: the model's module tree, mirrored on the client without weights.

`model.model.layers[-1].output` walks envoys built from the module tree (plain JSON) and records a
read of that module's output in the current trace. Envoys never touch the real module: the same
tree serves local and remote models.
"""

from __future__ import annotations

from typing import Any

from client_sdk.graph import Graph, _local, current_graph
from client_sdk.location import user_location
from client_sdk.proxy import Proxy, TracingError
from intervention.ir import format_location


def _at(message: str) -> str:
    """`message` naming the user's line, like every other raysight error."""
    return f"{message}\n  {format_location(user_location())}"


class Envoy:
    def __init__(self, model: Any, tree: dict[str, Any], path: str):
        """`model`: the LanguageModel whose module tree this is (only its name is used)."""
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_children", {})

    # -- navigation ----------------------------------------------------------------------------

    def _child(self, name: str) -> Envoy:
        env = self._children.get(name)
        if env is None:
            path = f"{self._path}.{name}" if self._path else name
            env = self._children[name] = Envoy(self._model, self._tree["children"][name], path)
        return env

    def __getattr__(self, name: str) -> Envoy:
        if name in self._tree["children"] and not name.isdigit():
            return self._child(name)
        if name.startswith("__"):
            raise AttributeError(name)
        children = ", ".join(n for n in self._tree["children"] if not n.isdigit()) or "none"
        raise AttributeError(_at(f"{self._describe()} has no submodule '{name}' (its submodules: {children})"))

    def __getitem__(self, index: int | slice) -> Envoy | list[Envoy]:
        names = list(self._tree["children"])
        if isinstance(index, slice):
            return [self._child(n) for n in names[index]]
        if not isinstance(index, int) or not all(n.isdigit() for n in names):
            raise TypeError(_at(f"{self._describe()} ({self._tree['type']}) cannot be indexed with {index!r}"))
        if not -len(names) <= index < len(names):
            raise IndexError(_at(f"{self._describe()} has {len(names)} modules; index {index} is out of range"))
        return self._child(names[index])

    def __len__(self) -> int:
        return len(self._tree["children"])

    def __iter__(self):
        return (self._child(n) for n in self._tree["children"])

    def __repr__(self) -> str:
        return f"<Envoy {self._describe()} ({self._tree['type']})>"

    def _describe(self) -> str:
        return f"'{self._path}'" if self._path else "the model"

    # -- module values -------------------------------------------------------------------------

    # Reads and writes bind to a call of the module: the trace's current call index (its first
    # call, unless a generation step loop says otherwise).

    @property
    def output(self) -> Proxy:
        """What this module's forward returned."""
        # The commonest read of all: `_graph`'s checks inline, then _record's read path.
        graph = getattr(_local, "graph", None)
        tracer = graph.tracer if graph is not None else None
        if tracer is None or tracer.model is not self._model:
            graph = self._graph()  # raises why this read cannot be recorded
        return graph.record_encoded("module.output", [self._path, tracer.call_index])

    @output.setter
    def output(self, value: Any) -> None:
        self._record("module.set_output", value)

    @property
    def input(self) -> Proxy:
        """The first argument this module was called with."""
        graph = self._graph()
        return graph.record_encoded("module.input", [self._path, graph.tracer.call_index])

    @input.setter
    def input(self, value: Any) -> None:
        self._record("module.set_input", value)

    @property
    def inputs(self) -> Proxy:
        """(args, kwargs) this module was called with."""
        graph = self._graph()
        return graph.record_encoded("module.inputs", [self._path, graph.tracer.call_index])

    def _record(self, op: str, value: Any) -> Proxy:
        graph = self._graph()
        return graph.record(op, [self._path, graph.tracer.call_index, value])

    def skip(self, value: Any) -> None:
        """Do not run this module (at the current call): `value` is its output instead."""
        self._record("module.skip", value)

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        """Run this module on traced values (outside the model's own forward)."""
        return self._graph().record("module.call", [self._path, *args], kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input"):
            object.__setattr__(self, name, value)  # runs the property's setter: records a write
            return
        raise AttributeError(f"cannot set '{name}' on {self._describe()}: only .output and .input can be assigned")

    def _graph(self) -> Graph:
        graph = current_graph()
        tracer = graph.tracer if graph else None
        if tracer is None:
            raise TracingError(
                f"{self._describe()} can only be read inside a trace (a `with model.trace(...)` block)",
                user_location(),
            )
        if tracer.model is not self._model:
            raise TracingError(
                f"{self._describe()} belongs to model '{self._model.name}', but the current trace "
                f"runs model '{tracer.model.name}'",
                user_location(),
            )
        return graph

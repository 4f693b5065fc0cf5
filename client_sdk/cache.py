"""`tracer.cache(...)`: many modules' activations at once, as nnsight 0.8's.

The cache is an input-less invoke of its own (`Invoke.cache`): a thread that reads each selected
module's output (and, if asked, its first input) at every call the trace makes — one per step in
a generation — after every other thread at that event, so it sees values after interventions. It
reads in the model's execution order (`module_order`), so it never waits on itself. The reads are
saved; the view hands out proxies inside the trace and their values after it.
"""

from __future__ import annotations

from typing import Any

from client_sdk.location import user_location
from client_sdk.proxy import Proxy, TracingError
from intervention.ir import Invoke


def record_cache(tracer: Any, modules: list | None, include_output: bool, include_inputs: bool) -> CacheView:
    graph, model = tracer.graph, tracer.model
    paths = None if modules is None else {_path_of(m) for m in modules}
    kinds = {k for k, on in (("output", include_output), ("input", include_inputs)) if on}
    steps = range(tracer.kwargs["max_new_tokens"]) if tracer.kind == "generate" else range(1)
    order = [(p, k) for p, k in model.module_order if k in kinds and p and (paths is None or p in paths)]
    if paths is not None:
        missing = paths - {p for p, _ in model.module_order}
        if missing:
            raise TracingError(f"cannot cache '{min(missing)}': no such module runs in this model", user_location())
    tracer.ir.invokes.append(Invoke(input=None, cache=True))
    before, tracer.invoke_index = tracer.invoke_index, len(tracer.ir.invokes) - 1
    entries: dict[str, list[dict[str, Proxy]]] = {}
    try:
        for step in steps:
            tracer.call_index = step
            for path, kind in order:
                visits = entries.setdefault(path, [])
                if len(visits) <= step:
                    visits.append({})
                proxy = graph.record_encoded(f"module.{kind}", [path, step])
                proxy.save()
                visits[step][kind] = proxy
    finally:
        tracer.invoke_index, tracer.call_index = before, 0
    return CacheView(entries, model.module_tree, "")


def _path_of(module: Any) -> str:
    if isinstance(module, str):
        return module
    path = getattr(module, "_path", None)
    if not isinstance(path, str):
        raise TracingError(f"tracer.cache(modules=...) takes modules or module paths, not {module!r}", user_location())
    return path


def _value(proxy: Proxy | None) -> Any:
    if proxy is None:
        return None
    return proxy._value if proxy._state == "ready" else proxy


class CacheView:
    """`cache["model.layers.0"].output` or `cache.model.layers[0].output`; `.input` if inputs were
    cached. One value per call; in a generation a list, one per step (`len(view)` steps)."""

    def __init__(self, entries: dict[str, list[dict[str, Proxy]]], tree: dict, path: str):
        object.__setattr__(self, "_entries", entries)
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_path", path)

    def _visits(self) -> list[dict[str, Proxy]]:
        if self._path not in self._entries:
            raise KeyError(f"'{self._path}' was not cached" if self._path else "the cache root is not a module")
        return self._entries[self._path]

    def _values(self, kind: str) -> Any:
        values = [_value(v.get(kind)) for v in self._visits()]
        return values[0] if len(values) == 1 else values

    @property
    def output(self) -> Any:
        return self._values("output")

    @property
    def input(self) -> Any:
        return self._values("input")

    def keys(self) -> list[str]:
        prefix = self._path
        return [k for k in self._entries if not prefix or k == prefix or k.startswith(prefix + ".")]

    def _child(self, name: str) -> CacheView:
        children = self._tree.get("children", {})
        if name not in children:
            raise AttributeError(f"'{self._path or 'the model'}' has no submodule '{name}'")
        path = f"{self._path}.{name}" if self._path else name
        return CacheView(self._entries, children[name], path)

    def __getattr__(self, name: str) -> CacheView:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._child(name)

    def __getitem__(self, key: str | int) -> CacheView:
        if isinstance(key, int):
            names = list(self._tree.get("children", {}))
            return self._child(names[key])
        if key in self._entries:
            return CacheView(self._entries, {}, key)
        view = self
        for part in key.split("."):
            view = view._child(part)
        return view

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._visits())

    def __repr__(self) -> str:
        return f"<CacheView '{self._path}' ({len(self.keys())} modules)>"

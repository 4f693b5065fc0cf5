"""After the outermost block: make the user's names hold real values instead of proxies.

`t = model.lm_head.output.save()` binds `t` to a proxy while tracing. When the session has run,
every name in the frame that ran the `with` block (and the lists, dicts and tuples it holds) that
refers to a saved proxy is rebound to its value, so `t` *is* a torch.Tensor afterwards. Unsaved
proxies stay proxies: using them raises an error that says to .save() them.
"""

from __future__ import annotations

import ctypes
import sys
from typing import TYPE_CHECKING, Any

from client_sdk.proxy import Proxy

if TYPE_CHECKING:
    from client_sdk.graph import Graph

_MAX_DEPTH = 4
_CONTAINERS = (list, dict, tuple)


def rebind_frame(frame, graph: Graph) -> None:
    if frame is None:
        return
    names = frame.f_locals
    changed = {}
    for name, value in list(names.items()):
        new = _swap(value, graph, 0)
        if new is not value:
            changed[name] = new
    if not changed:
        return
    if frame.f_locals is frame.f_globals:  # module level: f_locals is the globals dict
        frame.f_globals.update(changed)
        return
    names.update(changed)
    if sys.version_info < (3, 13):  # 3.13+: f_locals writes through (PEP 667)
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


def _swap(value: Any, graph: Graph, depth: int) -> Any:
    """`value` with this graph's ready proxies replaced; containers are updated in place."""
    if isinstance(value, Proxy):
        return value._value if value._graph is graph and value._state == "ready" else value
    if depth >= _MAX_DEPTH:
        return value
    if type(value) is list:
        for i, v in enumerate(value):
            if type(v) is Proxy:  # the common case (a list of saved values), without a call
                if v._graph is graph and v._state == "ready":
                    value[i] = v._value
            elif type(v) in _CONTAINERS:
                value[i] = _swap(v, graph, depth + 1)
    elif type(value) is dict:
        for k, v in value.items():
            value[k] = _swap(v, graph, depth + 1)
    elif type(value) is tuple:
        new = tuple(_swap(v, graph, depth + 1) for v in value)
        if any(a is not b for a, b in zip(new, value)):
            return new
    return value

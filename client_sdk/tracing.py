"""Tracing contexts: sessions, traces and invokes.

`with model.trace(...)` and `with session(...)` record into a `Graph` while their body runs. When
the outermost block exits, its backend (local or remote, chosen when the block was opened) runs
the recorded session; then each saved proxy gets its real value and the user's names in the
block's frame are rebound to those values.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

from client_sdk.backends import Backend, RemoteHandle, backend_for
from client_sdk.cache import CacheView, record_cache
from client_sdk.config import CONFIG
from client_sdk.graph import Graph, current_graph, set_current_graph
from client_sdk.location import user_location
from client_sdk.proxy import Proxy, TracingError
from client_sdk.rebind import rebind_frame
from client_sdk.scan import scan
from intervention.errors import InterventionError
from intervention.ir import Invoke, TraceIR
from intervention.program import Recording


class Session:
    """`with client_sdk.session(remote=...) as s:` — several traces, possibly of several models,
    run in order as one request. Values flow between traces without .save()."""

    def __init__(self, remote: bool = False, blocking: bool = True, scan: bool | None = None):
        self.backend: Backend = backend_for(remote, blocking)
        self.graph = Graph(compiled=not self.backend.remote)
        self.handle: RemoteHandle | None = None
        # Check shapes on meta tensors before running (client_sdk/scan.py); None: CONFIG.scan's
        # default, which checks remote sessions only.
        self.scan = scan
        self.unscanned: set[int] = set()  # ids of its TraceIRs recorded with scan=False

    def __enter__(self) -> Self:
        _enter(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _exit(self, exc, sys._getframe(1))
        return False

    def stop(self) -> None:
        """Stop the session here: nothing after this point runs; what was saved comes back."""
        if self.graph.tracer is not None:
            self.graph.record("stop", ["session"])
        else:
            self.graph.record_step("stop", [], user_location())

    def log(self, *values: Any) -> None:
        """Print `values` on the client when the session reaches this point (same as client_sdk.log)."""
        if self.graph.tracer is not None:
            self.graph.record("log", list(values))
        else:
            self.graph.record_step("log", list(values), user_location())

    # Non-blocking remote sessions: the handle's methods.
    @property
    def id(self) -> str:
        return self._handle().id

    def status(self) -> dict:
        return self._handle().status()

    def result(self) -> dict[int, Any]:
        """Wait for the result; saved names in the caller's scope then hold their values."""
        return self._result(sys._getframe(1))

    def _result(self, frame) -> dict[int, Any]:
        values = self._handle().result()
        self.graph.resolve(values)
        rebind_frame(frame, self.graph)
        return values

    def cancel(self) -> None:
        self._handle().cancel()

    def _handle(self) -> RemoteHandle:
        if self.handle is None:
            raise TracingError("this session was not submitted with remote=True, blocking=False")
        return self.handle


class Tracer:
    """`with model.trace(input) as tracer:` — one forward pass; `with model.generate(input,
    max_new_tokens=N) as tracer:` — one generation, where `for step in tracer.iter[...]` binds the
    loop body to those steps. Outside a session it is a session of one trace (non-blocking:
    `tracer.id`, `.status()`, `.result()`, `.cancel()`)."""

    def __init__(self, model: Any, input: Any, remote: bool, blocking: bool, kwargs: dict, kind: str = "forward"):
        self.model = model
        self.input = input
        self.kwargs = kwargs
        self.kind = kind
        self.remote, self.blocking = remote, blocking
        self.invoke_index: int | None = None
        self.in_invoke = False  # an invoke block is open (with an input or without)
        self.call_index = 0  # which call of a module a read binds to: the step in step loops
        self.session: Session | None = None  # the session this trace records into
        self.owns_session = False
        self.ir: TraceIR | None = None
        self.recording: Recording | None = None  # its steps, compiled as recorded (local runs)
        self.scan: bool | None = None  # False: no shape check of this trace; see Session.scan

    @property
    def graph(self) -> Graph:
        return self.session.graph

    def __enter__(self) -> Self:
        session = _current_session()
        if session is None:  # a trace outside a session is a session of one
            session = Session(self.remote, self.blocking, scan=self.scan)
            _enter(session)
            self.owns_session = True
        elif self.remote and not session.backend.remote:
            raise TracingError("remote=True on a trace inside a local session: pass it to the session", user_location())
        self.session = session
        graph = self.graph
        if graph.tracer is not None:
            raise TracingError("traces cannot be nested", user_location())
        loc = user_location()
        self.ir = TraceIR(model=graph.model_name(self.model), kind=self.kind,
                          kwargs=graph.encode(self.kwargs, loc), loc=loc)
        if self.input is not None:
            self.ir.invokes.append(Invoke(input=graph.encode(self.input, loc)))
        graph.open(self)
        if self.scan is False:
            session.unscanned.add(id(self.ir))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.graph.flush_lazies()  # what was deferred runs in this trace
        self.graph.tracer = None
        if exc is None and all(i.input is None for i in self.ir.invokes):
            exc = TracingError("this trace has no input: pass a prompt to trace() or use tracer.invoke()", self.ir.loc)
            if self.owns_session:
                _exit(self.session, exc, None)
            raise exc
        if self.owns_session:
            _exit(self.session, exc, sys._getframe(1))
        return False

    def invoke(self, input: Any = None) -> Invoker:
        """Add `input` to this trace's batch; code in the block sees only its rows. Without an
        input, code in the block sees the whole batch (every invoke's rows)."""
        return Invoker(self, input)

    def stop(self) -> None:
        """Stop this trace here: the rest of its forward pass (or generation) does not run."""
        self.graph.record("stop", ["trace"])

    @property
    def result(self) -> Any:
        """Inside the block: what the model call returned, once it has (for a trace the model's
        output: `.logits`, ...; for a generation the token ids, prompt and new tokens); `.save()`
        it to keep it. After a non-blocking block: `tracer.result()` waits for the request."""
        if self.session is not None and self.graph.tracer is self:
            return self.graph.record("result", [])
        return self._wait

    @property
    def iter(self) -> Steps:
        """`for step in tracer.iter[0:3]:` (also `iter[i]`, `iter[[0, 2]]`, open-ended `iter[1:]`):
        the loop body runs once per selected generation step, its reads and edits bound to that
        step (a module's k-th call)."""
        self._recording("tracer.iter")
        if self.kind != "generate":
            raise TracingError(
                "tracer.iter selects generation steps: use it inside `with model.generate(...)`, not a trace",
                user_location(),
            )
        return Steps(self)

    def all(self) -> Steps:
        """Every generation step: `for step in tracer.all():` (same as `tracer.iter[:]`)."""
        return self.iter[:]

    def cache(
        self, modules: list | None = None, include_output: bool = True, include_inputs: bool = False
    ) -> CacheView:
        """Record many modules' activations: their outputs (and first inputs if
        `include_inputs`), after interventions, at every call (every step of a generation).
        `modules`: envoys or module paths; None: every module. Returns a view: after the block,
        `cache["model.layers.0"].output` or `cache.model.layers[0].output` is the value."""
        self._recording("tracer.cache()")
        return record_cache(self, modules, include_output, include_inputs)

    def _recording(self, what: str) -> None:
        if self.session is None or self.graph.tracer is not self:
            raise TracingError(f"{what} must be used inside its `with` block", user_location())

    # A non-blocking trace outside a session: its session's handle (`tracer.result()` waits).
    @property
    def id(self) -> str:
        return self.session.id

    def status(self) -> dict:
        return self.session.status()

    def _wait(self) -> dict[int, Any]:
        """Wait for the result; saved names in the caller's scope then hold their values."""
        return self.session._result(sys._getframe(1))

    def cancel(self) -> None:
        self.session.cancel()


class Invoker:
    def __init__(self, tracer: Tracer, input: Any):
        self.tracer, self.input = tracer, input

    def __enter__(self) -> Self:
        tracer = self.tracer
        if tracer.in_invoke:
            raise TracingError("invokes cannot be nested", user_location())
        tracer.in_invoke = True
        # Without an input, the invoke adds no rows and its code sees the whole batch (nnsight's
        # input-less invoke): a thread of its own, like any invoke.
        value = None if self.input is None else tracer.graph.encode(self.input, user_location())
        tracer.ir.invokes.append(Invoke(input=value))
        tracer.invoke_index = len(tracer.ir.invokes) - 1
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer.invoke_index = None
        self.tracer.in_invoke = False
        return False


class Steps:
    """A selection of generation steps (`tracer.iter[...]`): iterating it yields each step index
    with the tracer's call index set to it, so the loop body, recorded once per step, binds its
    reads and edits to that step. Open-ended selections end at max_new_tokens."""

    def __init__(self, tracer: Tracer, start: int = 0, stop: int | None = None, steps: list[int] | None = None):
        self.tracer, self.start, self.stop, self.steps = tracer, start, stop, steps

    def __getitem__(self, key: int | slice | list[int]) -> Steps:
        if isinstance(key, slice):
            if key.step not in (None, 1):
                return Steps(self.tracer, steps=list(range(key.start or 0, self._bound(key.stop), key.step)))
            return Steps(self.tracer, key.start or 0, key.stop)
        if isinstance(key, (list, tuple)):
            return Steps(self.tracer, steps=list(key))
        if isinstance(key, int) and not isinstance(key, bool):
            return Steps(self.tracer, key, key + 1)
        raise TracingError(f"tracer.iter takes a step, a slice or a list of steps, not {key!r}", user_location())

    def _bound(self, stop: int | None) -> int:
        n = self.tracer.kwargs.get("max_new_tokens")
        if stop is None:
            if n is None:
                raise TracingError("an open-ended tracer.iter[...] or tracer.all() needs max_new_tokens", user_location())
            return n
        return stop

    def __iter__(self) -> Iterator[int]:
        tracer = self.tracer
        steps = self.steps if self.steps is not None else range(self.start, self._bound(self.stop))
        n = tracer.kwargs.get("max_new_tokens")
        for step in steps:
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise TracingError(f"a generation step must be an integer >= 0, not {step!r}", user_location())
            if n is not None and step >= n:
                raise TracingError(
                    f"step {step} does not exist: this generation has max_new_tokens={n} (steps 0-{n - 1})",
                    user_location(),
                )
        previous = tracer.call_index
        try:
            for step in steps:
                tracer.call_index = step
                yield step
        finally:
            tracer.call_index = previous


# -- running the outermost block ---------------------------------------------------------------

_open = threading.local()


def _current_session() -> Session | None:
    return getattr(_open, "session", None)


def _enter(session: Session) -> None:
    if _current_session() is not None or current_graph() is not None:
        raise TracingError("sessions cannot be nested", user_location())
    _open.session = session
    set_current_graph(session.graph)


def _leave(session: Session) -> None:
    _open.session = None
    set_current_graph(None)


def _exit(session: Session, exc: BaseException | None, frame) -> None:
    graph = session.graph
    _leave(session)
    if exc is not None:
        graph.abandon()
        return
    try:
        ir = graph.session_ir()
        if not ir.traces and not ir.steps:
            graph.resolve({})
            return
        if _scans(session):
            scan(ir, graph.tensors, graph.models, session.unscanned)
        outcome = session.backend.run(graph)
        if isinstance(outcome, RemoteHandle):  # non-blocking: values come with session.result()
            session.handle = outcome
            return
        graph.resolve(outcome)
        rebind_frame(frame, graph)
    except InterventionError as err:
        graph.abandon()
        _free_frames(err)
        # The message names the user's line; engine frames would only hide it.
        raise err.with_traceback(None) from None
    except KeyboardInterrupt:  # the backend said what became of the request; no values come
        graph.abandon()
        raise


def _free_frames(err: BaseException) -> None:
    """Drop the tracebacks of `err`'s chained exceptions (hidden by `from None` anyway): their
    frames are the engine's and the model's forward, holding activations, and a notebook keeps
    the last error alive. Their types and messages stay."""
    seen: set[int] = set()
    chained = err.__cause__ or err.__context__
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.with_traceback(None)
        chained = chained.__cause__ or chained.__context__


@contextmanager
def recording(remote: bool = False) -> Iterator[Graph]:
    """Record what the block traces without running it: the graph holds the session's IR and
    client tensors (`graph.session_ir()`, `graph.tensors`). For tests and tools."""
    session = Session(remote=remote)
    _enter(session)
    try:
        yield session.graph
    finally:
        _leave(session)
        session.graph.done = True


def _scans(session: Session) -> bool:
    """Whether the session's traces get the shape check: its own `scan=`, else CONFIG.scan, else
    only when it goes to a server (where a failed forward would have waited in a queue)."""
    if session.scan is not None:
        return session.scan
    return CONFIG.scan if CONFIG.scan is not None else session.backend.remote


# -- module-level helpers (client_sdk.save / log / stop / session) ---------------------------------


def _require_graph(what: str) -> Graph:
    graph = current_graph()
    if graph is None or graph.tracer is None:
        where = "inside a trace or a session" if what in ("log", "stop") else "inside a trace"
        raise TracingError(f"client_sdk.{what}() must be called {where}", user_location())
    return graph


def save(value: Any) -> Any:
    """Keep `value` for after the block (same as value.save())."""
    if isinstance(value, Proxy):
        return value.save()
    _require_graph("save")
    return value


def _session_body() -> Graph | None:
    """The graph of the session whose body (outside any trace) is running here, if any."""
    graph = current_graph()
    return graph if graph is not None and graph.tracer is None and not graph.done else None


def log(*values: Any) -> None:
    """Print `values` on the client when the model reaches this point, in order. In a session
    body (outside any trace) it prints after the traces before it and before those after it."""
    graph = _session_body()
    if graph is not None:
        graph.record_step("log", list(values), user_location())
        return
    _require_graph("log").record("log", list(values))


def stop() -> None:
    """Stop the innermost trace here: nothing after this point in it runs. In a session body
    (outside any trace) stop the session: the traces after this point do not run."""
    graph = _session_body()
    if graph is not None:
        graph.record_step("stop", [], user_location())
        return
    _require_graph("stop").record("stop", ["trace"])


def session(remote: bool = False, blocking: bool = True, scan: bool | None = None) -> Session:
    """A session that may hold traces of several models."""
    return Session(remote=remote, blocking=blocking, scan=scan)

"""The HTTP ingress: auth, limits, validation, ids; then hands the session to the model replica
that runs it (a session on one model) or to the session runner (a session across models).

Nothing invalid is queued: the body is decoded (safetensors + JSON, never pickle) and validated
against the served models' module trees before the request exists. State lives in the request
store, so this replica can restart without losing accepted requests.
"""


import asyncio
import base64
import contextlib
import contextvars
import json
import math
import time
import uuid
import weakref
from collections import Counter
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from actors.request_store import Quota, StartedCall, StoreClient, StoreSpec, StoreUnavailable
from actors.supervisor import Lease, replica_failure
from intervention import timeline
from intervention.errors import InterventionError
from intervention.events import (
    ERROR,
    REQUEST_ID_HEADER,
    RETRYING,
    STATUS,
    STATUS_HOLD_S,
    STATUS_INTERVAL_S,
    TERMINAL,
)
from intervention.ir import SessionIR
from intervention.module_tree import module_paths
from intervention.validate import InputBounds, Limits, validate_session
from intervention.wire import decode_session
from serve_app import errors, openapi, readiness
from serve_app.auth import KeyRing
from serve_app.config import AppConfig
from serve_app.errors import ApiError
from serve_app.recordings import WAIT_S, Recordings
from serve_app.replicas import model_loads
from serve_app.schemas import Accepted, ModelInfo, ModelSummary, RequestStatus

app = FastAPI(
    title="raysight",
    version="1",
    description="Run nnsight-style interventions on served models. Every route but /healthz and /readyz needs "
    "`Authorization: Bearer <key>`. Requests are safetensors files whose metadata holds the "
    "session IR as JSON; results are safetensors files too.",
)
errors.install(app)
openapi.install(app)

SSE_HEARTBEAT_S = 15.0
INLINE_RESULT_BYTES = 1 << 20  # results up to this size ride in the COMPLETED event of a stream
# Bodies larger than this are decoded and validated on a worker thread, so the event loop (every
# other route, /healthz included) never waits on them; smaller ones cost less than the hop.
OFF_LOOP_BYTES = 64 << 10
# A session whose body is at most this large goes to its replica by value: Serve's gRPC call
# straight to the replica (`_by_reference=False`), about a millisecond less per round trip than
# a Ray actor call (docs/BENCHMARKS.md). Its messages are capped at 4 MiB
# (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH), so larger ones go by reference; the answer is at
# most an inline result (INLINE_RESULT_BYTES) and a few fields.
BY_VALUE_BYTES = 1 << 20


# Helpers come before the class: serve.ingress snapshots the module's globals when it wraps it.


def _chunk(events: list[tuple[int, dict]], end_supersedes: bool) -> str:
    """Numbered events as one SSE chunk. QUEUED/RUNNING are states, not news: one directly
    followed by another is stale and left out; with `end_supersedes` (a blocking client, whose
    status line the end replaces) so is one directly followed by the end. Its id is skipped,
    as the ids of a resumed stream are the store's event indices."""
    out = []
    for i, (n, event) in enumerate(events):
        kind = event["event"]
        if kind in STATUS and i + 1 < len(events):
            after = events[i + 1][1]["event"]
            if after in STATUS or (end_supersedes and after in TERMINAL):
                continue
        data = event["data"]
        if "result" in event:
            data = {**data, "result": base64.b64encode(event["result"]).decode()}
        out.append(f"id: {n}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n")
    return "".join(out)


def _event_stream(events, status_code: int = 200, request_id: str | None = None) -> StreamingResponse:
    """`request_id`: a submit's stream names its request in a header too (REQUEST_ID_HEADER),
    which reaches the client with the status line, before the first event: a connection that
    breaks before then still leaves the client the id of a request the server accepted."""
    # No charset: an event stream is always UTF-8 (Starlette would add "; charset=utf-8").
    headers = {"Cache-Control": "no-cache", "Content-Type": "text/event-stream"}
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    return StreamingResponse(events, status_code=status_code, headers=headers)


def _next_status_time(blocking: bool, sent: list[tuple[int, dict]], deadline: float) -> float:
    """When a stream that just sent `sent` may next send status alone: a blocking client's status
    line changes at most every STATUS_INTERVAL_S (a chunk of news alone leaves the time as it
    was, `deadline`); other streams send every batch."""
    if not blocking:
        return 0.0
    if any(event["event"] in STATUS for _, event in sent):
        return time.monotonic() + STATUS_INTERVAL_S
    return deadline


async def _end_within(run: asyncio.Task, timeout_s: float, news: asyncio.Event) -> dict | None:
    """`run`'s end if it comes within `timeout_s` and before `news` (None: not yet, news, or
    none to send as it is)."""
    noted = asyncio.ensure_future(news.wait())
    try:
        await asyncio.wait({run, noted}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        noted.cancel()
    if not run.done() or run.cancelled() or run.exception() is not None:
        return None
    return run.result()


def _news_only_from_here(session: SessionIR) -> bool:
    """Whether the only news (LOG, RETRYING) a request may have is what this ingress writes: a
    session on one model (this ingress retries it) that logs nothing."""
    return (len({t.model for t in session.traces}) == 1 and not any(s.op == "log" for s in session.steps)
            and not any(n.op == "log" for t in session.traces for n in t.nodes))


def _count_tokens(files: dict[str, str]):
    """A prompt's token count with the model's own tokenizer (`tokenizers` alone: no files, no
    transformers), or None when the model ships no tokenizer.json."""
    text = files.get("tokenizer.json")
    if text is None:
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(text)
    return lambda prompt: len(tokenizer.encode(prompt).ids)


def _last_event_id(request: Request) -> int:
    """The index to resume after (`Last-Event-ID`, as this route numbers events), or -1."""
    raw = request.headers.get("last-event-id")
    if raw is None or raw == "":
        return -1
    if not raw.isdigit() or len(raw) > 18:  # digits only: no sign, no spaces, no huge numbers
        raise ApiError(422, "invalid_request",
                       f"Last-Event-ID must be a non-negative integer (an event id of this stream), got {raw[:40]!r}")
    return int(raw)


def _too_many(cap: int) -> ApiError:
    return ApiError(429, "too_many_requests", f"at most {cap} requests per user may run at once "
                    "(limits.max_concurrent_per_user); wait for one to finish")


def _no_such_request(request_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no request '{request_id}' (ids are visible to their owner only)")


def _no_result_message(state: str) -> str:
    if state == "CANCELLED":
        return "the request was CANCELLED: it has no result"
    if state == "ERROR":
        return "the request ended in ERROR: it has no result (its status and events say what failed)"
    return f"the request is {state}: its result is not ready yet"


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict[str, Any], runner: Any, models: dict[str, Any]):
        self.config = AppConfig.model_validate(config)
        self.runner = runner
        self.models = models
        self.by_value = {name: handle.options(_by_reference=False) for name, handle in models.items()}
        self.keys = KeyRing(self.config.auth)
        self.store = StoreClient(StoreSpec(self.config.resolved_state_dir(), self.config.result_ttl_s))
        self.lease = Lease(self.store)  # holds the requests this replica admitted until a runner claims them
        self.infos: dict[str, dict] = {}
        self.paths: dict[str, set[str]] = {}
        self.orders: dict[str, list[tuple[str, str]]] = {}
        self.inputs: dict[str, InputBounds] = {}
        self.watchers: set[asyncio.Task] = set()
        self.running: Counter[str] = Counter()  # user -> her requests this replica runs (`_start_run`)
        self.streams: dict[str, int] = {}  # user -> event streams open on this replica
        self.retrying: dict[str, asyncio.Event] = {}  # request -> set at RETRYING, while its stream waits for the end
        self.recordings = Recordings(self._recorded)  # ends a replica answered before the store had them
        lim = self.config.limits
        self.limits = Limits(max_traces=lim.max_traces, max_nodes=lim.max_nodes, max_tensor_bytes=lim.max_request_bytes)
        self.max_new_tokens = {m.name: m.max_new_tokens for m in self.config.models}
        self.quota = Quota(max_active=lim.max_concurrent_per_user, max_result_bytes=lim.max_result_bytes_per_user,
                           max_log_bytes=lim.max_log_bytes_per_user)

    # -- health and models ---------------------------------------------------------------------

    @app.get("/healthz", tags=["health"])
    async def healthz(self) -> dict[str, str]:
        """Liveness: the ingress answers (models may still be loading: see /readyz)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=readiness.Readiness, tags=["health"],
             responses={503: {"model": readiness.Readiness, "description": "Not ready: the failed checks say why"}})
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 once every configured model has a running replica, else 503; the body
        lists each check (and, for the models check, each model's replicas and state)."""
        report = await readiness.run_checks(readiness.checks_for(self.config, self.store.handle))
        if not report.ready and not next(c for c in report.checks if c.name == "store").ok:
            self.store.refresh()  # a store gone for good is created again (its state is on disk)
        return JSONResponse(report.model_dump(), status_code=200 if report.ready else 503)

    @app.get("/v1/models", response_model=list[ModelSummary], tags=["models"])
    async def list_models(self, request: Request) -> list[ModelSummary]:
        """Each model's live replica count (autoscaling changes it) and its queue: requests waiting
        in its replicas and running on them, summed over every replica."""
        self.keys.user_for(request)
        loads = await model_loads(list(self.models))
        return [ModelSummary(name=name, replicas=load.replicas, state=load.state, queue_length=load.waiting,
                             running=load.running, nodes=load.nodes) for name, load in loads.items()]

    @app.get("/v1/models/{name}", response_model=ModelInfo, tags=["models"])
    async def model_info(self, name: str, request: Request) -> dict:
        self.keys.user_for(request)
        return await self._info(name)

    async def _info(self, name: str) -> dict:
        if name not in self.models:
            raise ApiError(404, "unknown_model", f"no model named '{name}' is served (served: {', '.join(self.models)})")
        if name not in self.infos:
            info = await self.models[name].info.remote()
            self.infos[name] = info
            self.paths[name] = set(module_paths(info["module_tree"]))
            self.orders[name] = [tuple(e) for e in info["module_order"]]
            self.inputs[name] = InputBounds.from_config(info["config"], _count_tokens(info["tokenizer_files"]))
        return self.infos[name]

    # -- requests ------------------------------------------------------------------------------

    @app.post("/v1/requests", status_code=202, response_model=Accepted, tags=["requests"])
    async def submit(self, request: Request) -> Response:
        """Submit a session (a safetensors body) -> 202 {id}. Optional header
        `X-Raysight-Timeout`: seconds, capped by the server's limit.

        With `Accept: text/event-stream` the answer is instead the request's event stream after
        RECEIVED (its header REQUEST_ID_HEADER carries the id), whose COMPLETED event carries a small result inline
        (base64 `result`): a blocking client needs one round trip, not three."""
        entered = time.time()  # for intervention/timeline.py, once the request has an id
        user = self.keys.user_for(request)
        cap = self.config.limits.max_concurrent_per_user
        # A user at her limit is refused before a large body is read or decoded (admit re-checks
        # atomically below; a small body costs less to decode than this extra store call).
        declared = request.headers.get("content-length", "")
        small = declared.isdigit() and int(declared) <= OFF_LOOP_BYTES
        if not small and await self._store("active", user) >= cap:
            raise _too_many(cap)
        timeout = self._timeout(request)  # a bad header is refused before the request exists
        body = await self._read_body(request)
        off_loop = len(body) > OFF_LOOP_BYTES
        try:
            session, tensors = await run_in_threadpool(decode_session, body) if off_loop else decode_session(body)
            for name in {t.model for t in session.traces}:
                if name in self.models:
                    await self._info(name)
            served = {n: self.paths.get(n, set()) for n in self.models}  # used ones were fetched above
            check = partial(validate_session, session, tensors, served, self.limits, self.orders,
                            max_new_tokens=self.max_new_tokens, inputs=self.inputs)
            await run_in_threadpool(check) if off_loop else check()
        except InterventionError as err:
            raise errors.from_intervention(err) from None
        request_id = uuid.uuid4().hex
        timeline.mark(request_id, "ingress.entered", at=entered)
        streaming = "text/event-stream" in request.headers.get("accept", "")
        if streaming and not self._stream_slot(user):
            raise self._too_many_streams()
        inline = INLINE_RESULT_BYTES if streaming else 0
        run = partial(self._start_run, session=session, tensors=tensors, timeout=timeout, user=user,
                      inline_limit=inline, by_value=len(body) <= BY_VALUE_BYTES)
        watcher = None
        try:
            admission = self._admit(request_id, user, len(session.traces))
            # A session on one model leaves with its admit call while this ingress's own count says
            # the user is below her limit (so a refusal is rare): the store holds its replica's calls
            # until the admission is there and drops them if it was refused; a refusal cancels it.
            if len({t.model for t in session.traces}) == 1 and self.running[user] + 1 < cap:
                watcher = run(request_id)
            refused = await self._answer(admission)
            if refused is not None and refused["code"] == "too_many_requests" and await self.recordings.of_owner(user):
                # Some of her requests had ended, but the store had not recorded it yet: again, under
                # a new id (the store drops whatever the run sent with the refused one records).
                if watcher is not None:
                    watcher.cancel()
                    watcher = None
                request_id = uuid.uuid4().hex
                refused = await self._answer(self._admit(request_id, user, len(session.traces)))
            if refused is not None:
                raise ApiError(refused["status"], refused["code"], refused["message"])
            if watcher is None:
                watcher = run(request_id)
        except BaseException:
            if watcher is not None:  # not admitted (or the store is gone): it must not run
                watcher.cancel()
            if streaming:  # no stream comes of it: give the slot back
                self._release_slot(user)
            raise
        if streaming:  # from here the stream holds the slot (see _stream)
            end_wait = STATUS_INTERVAL_S if _news_only_from_here(session) else STATUS_HOLD_S
            events = self._sse(request_id, user, 0, INLINE_RESULT_BYTES, watcher, end_wait)
            return _event_stream(self._stream(user, events), status_code=202, request_id=request_id)
        return JSONResponse({"id": request_id}, status_code=202)

    def _admit(self, request_id: str, user: str, n_traces: int) -> StartedCall:
        return self.store.start("admit", request_id, user, n_traces, self.quota, self.lease.id)

    def _start_run(self, request_id: str, session: SessionIR, tensors: dict, timeout: float, user: str,
                   inline_limit: int, by_value: bool) -> asyncio.Task:
        """Start running the request (`_watch`), apart from this HTTP request: Serve cancels the
        handle calls a request made when its client disconnects (a blocking client's Ctrl-C, a
        dropped stream that the client would resume by id), which would leave the request RUNNING
        for good. In a fresh context the call is no child of this request; DELETE and the time
        limit end it."""
        watcher = asyncio.get_running_loop().create_task(
            self._watch(request_id, session, tensors, timeout, user, inline_limit, by_value),
            context=contextvars.Context())
        self.watchers.add(watcher)
        self.running[user] += 1

        def done(task: asyncio.Task) -> None:
            self.watchers.discard(task)
            self.running[user] -= 1
            if not self.running[user]:
                del self.running[user]

        watcher.add_done_callback(done)
        return watcher

    async def _watch(self, request_id: str, session: SessionIR, tensors: dict, timeout: float, user: str,
                     inline_limit: int, by_value: bool) -> dict | None:
        """Run the request to its end: a session on one model straight on that model's replica, one
        across models on a session runner. Returns its end when a blocking stream may send it as
        it is (see `_sse`), else None."""
        models = {trace.model for trace in session.traces}
        with self.lease.holding():  # until a runner claims it (and again while a retry waits for one)
            if len(models) == 1:
                return await self._run_direct(request_id, models.pop(), session, tensors, timeout, user,
                                              inline_limit, by_value)
            await self._run_on_runner(request_id, (request_id, session, tensors, timeout, user))
            return None

    async def _run_direct(self, request_id: str, model: str, session: SessionIR, tensors: dict, timeout: float,
                          user: str, inline_limit: int, by_value: bool) -> dict | None:
        """The model's replica runs the session and records its end (the request survives this
        ingress); if the replica dies, once more on another (traces have no side effects) before
        the request ends in ERROR. `by_value`: small enough for a call by value (BY_VALUE_BYTES)."""
        handle = (self.by_value if by_value else self.models)[model]
        for attempt in (1, 2):
            try:
                timeline.mark(request_id, "ingress.sent")
                end = await handle.run_session.remote(request_id, session, tensors, timeout, user, inline_limit)
                timeline.mark(request_id, "ingress.answered")
                if end is not None and not end["recorded"]:  # the store is recording it
                    self.recordings.add(request_id, user, end["id"])
                return end if attempt == 1 and end is not None and not end["news"] else None
            except Exception as exc:  # noqa: BLE001 - the replica failed
                failure = exc
            if not await self._before_retry(request_id, attempt, {"code": "replica_failed", "model": model,
                                                                  "attempt": 2}):
                return None
        await self._fail(request_id, replica_failure(session.traces[0], 0, failure))
        return None

    async def _run_on_runner(self, request_id: str, args: tuple) -> None:
        """Run the request on a session runner; if that runner dies, once more on another (traces
        have no side effects) before the request ends in ERROR: it must end either way."""
        for attempt in (1, 2):
            try:
                await self.runner.run.remote(*args)
                return
            except Exception as exc:  # noqa: BLE001 - the runner failed
                failure = type(exc).__name__
            if not await self._before_retry(request_id, attempt, {"code": "runner_failed", "attempt": 2}):
                return
        message = f"the session runner failed ({failure}), also when retried once; retry the request later"
        await self._fail(request_id, {"code": "runner_failed", "message": message, "location": None})

    async def _before_retry(self, request_id: str, attempt: int, reason: dict) -> bool:
        """The process running the request died: take its lease back (this ingress holds it until
        the next runner claims it) and, after a first attempt, say RETRYING. False when there is nothing to retry (it has ended, or the store is gone: the
        store ends it as an orphan once it is back)."""
        try:
            state = await self.store.call("release", request_id, self.lease.id)
            if state is None or state in TERMINAL:
                return False
            if attempt == 1:
                await self.store.call("add_event", request_id, RETRYING, reason)
                if (stream := self.retrying.get(request_id)) is not None:
                    stream.set()  # news for its blocking stream, which waits for the end
            return True
        except StoreUnavailable:
            return False

    async def _fail(self, request_id: str, error: dict) -> None:
        try:
            await self.store.call("finish", request_id, ERROR, error)
        except StoreUnavailable:
            pass

    async def _recorded(self, ends: list[tuple[str, int]]) -> None:
        """Wait until the store has these ends (`Recordings`); a store that is down fails the read after it."""
        with contextlib.suppress(StoreUnavailable):
            await self.store.call("recorded", ends, WAIT_S)

    async def _store(self, method: str, *args: Any) -> Any:
        """A store call from a route: a store that stays down is a 503, not a 500."""
        return await self._answer(self.store.start(method, *args))

    async def _answer(self, call: StartedCall) -> Any:
        try:
            return await call.answer(self.store)
        except StoreUnavailable as exc:
            raise ApiError(503, "store_unavailable", f"{exc}; retry shortly") from None

    async def _read_body(self, request: Request) -> bytes:
        cap = self.config.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, "too_large", f"the request is {declared} bytes; the limit is {cap}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise ApiError(413, "too_large", f"the request exceeds the limit of {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _timeout(self, request: Request) -> float:
        limit = self.config.limits.request_timeout_s
        asked = request.headers.get("x-raysight-timeout")
        if not asked:
            return limit
        try:
            seconds = float(asked)
        except ValueError:
            seconds = math.nan
        if not seconds > 0 or math.isinf(seconds):  # nan fails `> 0` too
            raise ApiError(422, "invalid_request", f"X-Raysight-Timeout must be a positive number of seconds, got {asked!r}")
        return min(limit, seconds)

    @app.get("/v1/requests/{request_id}", response_model=RequestStatus, tags=["requests"])
    async def status(self, request_id: str, request: Request) -> dict:
        user = self.keys.user_for(request)
        await self.recordings.of_request(request_id)
        status = await self._store("status", request_id, user)
        if status is None:
            raise _no_such_request(request_id)
        return status

    @app.get("/v1/requests/{request_id}/events", tags=["requests"])
    async def events(self, request_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: RECEIVED, QUEUED{position}, RUNNING{trace, of}, LOG{message},
        COMPLETED, ERROR{code, message, location}, CANCELLED. Resume with `Last-Event-ID`."""
        user = self.keys.user_for(request)
        await self.recordings.of_request(request_id)
        if await self._store("status", request_id, user) is None:  # ownership before anything else
            raise _no_such_request(request_id)
        after = _last_event_id(request) + 1
        if not self._stream_slot(user):
            raise self._too_many_streams()
        return _event_stream(self._stream(user, self._sse(request_id, user, after)))

    def _stream_slot(self, user: str) -> bool:
        """Take one of `user`'s open-stream slots, if she has one left."""
        open_now = self.streams.get(user, 0)
        if open_now >= self.config.limits.max_streams_per_user:
            return False
        self.streams[user] = open_now + 1
        return True

    def _release_slot(self, user: str) -> None:
        left = self.streams.get(user, 1) - 1
        if left > 0:
            self.streams[user] = left
        else:
            self.streams.pop(user, None)

    def _too_many_streams(self) -> ApiError:
        limit = self.config.limits.max_streams_per_user
        return ApiError(429, "too_many_streams", f"at most {limit} event streams per user may be open at once "
                        "(limits.max_streams_per_user); close one first")

    def _stream(self, user: str, events):
        """`events` holding one of `user`'s stream slots until it ends: closed, finished, or
        dropped unstarted (a client gone before the first byte: released when collected)."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release_slot(user)

        async def held():
            try:
                async for chunk in events:
                    yield chunk
            finally:
                release()

        stream = held()
        weakref.finalize(stream, release)
        return stream

    async def _sse(self, request_id: str, user: str, after: int, inline_limit: int = 0,
                   run: asyncio.Task | None = None, end_wait: float = STATUS_HOLD_S):
        """The request's events from index `after` on, one chunk per batch the store gives.

        With `run` (this ingress's task running the request: a blocking client's POST stream) the
        stream starts after RECEIVED, whose data, the request's id, is the response's header
        REQUEST_ID_HEADER, and it is a status line: status alone (QUEUED, RUNNING) goes at most
        every STATUS_INTERVAL_S, the first time STATUS_INTERVAL_S after RECEIVED; news (LOG,
        RETRYING) and the end go at once. Progress would otherwise outweigh the values a session
        keeps on the cluster. A request that ends within `end_wait` with an end to send as it is
        gets that end as its one chunk, taken from `run` without asking the store: up to
        STATUS_INTERVAL_S when this ingress writes any news the request may have (RETRYING: it
        ends the wait; see `_news_only_from_here`), so a request under load costs no store call
        for its stream; else STATUS_HOLD_S."""
        held: list[tuple[int, dict]] = []
        blocking = run is not None
        deadline = time.monotonic() + (STATUS_INTERVAL_S if blocking else 0.0)
        if blocking:
            retrying = self.retrying[request_id] = asyncio.Event()
            try:
                end = await _end_within(run, end_wait, retrying)
            finally:
                del self.retrying[request_id]
            if end is not None:
                event = {"event": end["event"], "data": end["data"]}
                if end["result"] is not None:
                    event["result"] = end["result"]
                yield _chunk([(end["id"], event)], True)
                return
            after = 1  # past RECEIVED (the header)
        while True:
            left = deadline - time.monotonic()
            if held and left <= 0:
                yield _chunk(held, blocking)
                held, deadline = [], _next_status_time(blocking, held, deadline)
                continue
            # Within a status interval (statuses held, or one sent less than STATUS_INTERVAL_S
            # ago) one call waits for news or the end: not one call per batch of status.
            quiet = blocking and left > 0
            try:
                batch = await self.store.call("events", request_id, user, after,
                                              left if quiet else SSE_HEARTBEAT_S, inline_limit, quiet)
            except StoreUnavailable:
                batch = None  # the client resumes with Last-Event-ID
            if batch is None:
                if held:
                    yield _chunk(held, blocking)
                return
            if not batch:
                if quiet:
                    continue  # the status interval is over: what is held goes now
                # Nothing new: a request that has ended has nothing more to send (a client
                # resuming after its last event gets an empty stream, not heartbeats forever).
                try:
                    status = await self.store.call("status", request_id, user)
                except StoreUnavailable:
                    return
                if status is None or status["state"] in TERMINAL:
                    return
                yield ": heartbeat\n\n"
                continue
            held += [(after + i, event) for i, event in enumerate(batch)]
            after += len(batch)
            ended = batch[-1]["event"] in TERMINAL  # the store records nothing after the end
            news = any(event["event"] not in STATUS for event in batch)
            if ended or news or time.monotonic() >= deadline:
                yield _chunk(held, blocking)
                held, deadline = [], _next_status_time(blocking, held, deadline)
            if ended:
                return

    @app.get("/v1/requests/{request_id}/result", tags=["requests"],
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def result(self, request_id: str, request: Request) -> Response:
        """The saved values as a safetensors file (kept until fetched or the TTL passes)."""
        user = self.keys.user_for(request)
        await self.recordings.of_request(request_id)
        found = await self._store("result", request_id, user)
        if found is None:
            raise _no_such_request(request_id)
        state, data = found
        if data is None:
            if state == "COMPLETED":
                raise ApiError(410, "expired", "the result was already fetched and has expired")
            raise ApiError(409, "not_ready", _no_result_message(state))
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v1/requests/{request_id}", status_code=202, tags=["requests"])
    async def cancel(self, request_id: str, request: Request) -> dict:
        user = self.keys.user_for(request)
        await self.recordings.of_request(request_id)
        state = await self._store("request_cancel", request_id, user)
        if state is None:
            raise _no_such_request(request_id)
        return {"id": request_id, "state": state, "cancel_requested": state not in TERMINAL}

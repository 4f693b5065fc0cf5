"""Cross-request batching, in-process (no Ray): the pure scheduler logic of
intervention/batching.py (compatibility key, fair order, batch selection) and the engine run the
model replica makes of a batch — for every experiment kind the engine supports, a trace batched
with other requests' traces gives what it gives alone (fp32, rel 1e-5).

The replica's asyncio part (actors/batcher.py) runs on the real cluster:
tests/test_batching_remote.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import client_sdk
from client_sdk import LanguageModel, tracing
from intervention.batching import (
    BatchLimits,
    FairQueue,
    Waiting,
    batch_key,
    select_batch,
    trace_size,
)
from intervention.engine import run_forward
from intervention.errors import Cancelled, ExecutionError
from intervention.ir import TraceIR
from intervention.program import Program, ProgramResult

P1 = "The Eiffel Tower is in the city of"  # 8 tokens
P3 = "The Kremlin is in the city of"  # 8 tokens
SHORT = "Paris"  # 1 token
MID = "Rome is a city"


@pytest.fixture(scope="module")
def lm(tiny_llama_path: Path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


Recorded = tuple[TraceIR, dict]


def record(body: Callable[[], None]) -> Recorded:
    with tracing.recording() as graph:
        body()
    (trace,) = graph.session_ir().traces
    return trace, graph.tensors


def batched(lm: LanguageModel, recs: list[Recorded], cancels: dict[int, threading.Event] | None = None,
            limits: BatchLimits | None = None) -> list[ProgramResult]:
    """What the replica does with these traces of different requests (one user each): the fair
    queue, the next batch (which must hold them all), one engine run of its programs."""
    queue = FairQueue()
    items = []
    for i, (trace, tensors) in enumerate(recs):
        cancel = (cancels or {}).get(i)
        on_log = (lambda m, c=cancel: c.set()) if cancel is not None else (lambda m: None)
        program = Program(trace, tensors=tensors, cancel=cancel, on_log=on_log)
        rows, width = trace_size(lm.tokenizer, trace, tensors)
        items.append(Waiting(f"user{i}", batch_key(trace), rows, width, program))
        queue.push(items[-1])
    batch = select_batch(queue.order(), limits or BatchLimits())
    assert batch == items, "these traces must share one forward"
    programs = [w.payload for w in batch]
    run_forward(lm.local_module, lm.tokenizer, programs)
    return [p.result() for p in programs]


def alone(lm: LanguageModel, rec: Recorded) -> ProgramResult:
    program = Program(rec[0], tensors=rec[1], on_log=lambda m: None)
    run_forward(lm.local_module, lm.tokenizer, [program])
    return program.result()


def assert_same(got: ProgramResult, want: ProgramResult) -> None:
    assert got.error is None and want.error is None, (got.error, want.error)
    assert got.stopped == want.stopped
    assert got.saves.keys() == want.saves.keys() and want.saves
    for k in want.saves:
        a, b = got.saves[k], want.saves[k]
        if isinstance(b, torch.Tensor):
            assert a.shape == b.shape, k
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert a == b, k


# -- the other requests each trace shares its forward with -----------------------------------------


def others(lm: LanguageModel) -> list[Recorded]:
    """Traces of other requests: a reader of another prompt, a longer-prompt editor that
    replaces a whole layer output, a short-prompt in-place editor."""

    def reader():
        with lm.trace(P3):
            lm.model.layers[1].output.save()
            lm.lm_head.output.save()

    def replacer():
        with lm.trace(P1 + " and the river is"):
            lm.model.layers[1].output = lm.model.layers[1].output * 3.0
            lm.lm_head.output.save()

    def zeroer():
        with lm.trace(SHORT):
            lm.model.layers[2].output[:] = 0
            lm.lm_head.output.save()

    return [record(reader), record(replacer), record(zeroer)]


def kinds(lm: LanguageModel) -> dict[str, Callable[[], None]]:
    layers = lm.model.layers

    def reads():
        with lm.trace(MID):
            layers[0].input.save()
            layers[1].output[:, -1].save()
            lm.lm_head.output.save()

    def edits():
        with lm.trace(MID):
            layers[1].output[:, -1, :] = 1.5
            layers[2].output = layers[2].output + 0.25
            lm.lm_head.output.save()

    def in_place():
        with lm.trace(P1):
            layers[1].output[:, 2] *= 0.5
            layers[2].mlp.output[..., 3] += 2.0
            lm.lm_head.output.save()

    def module_calls():
        with lm.trace(MID):
            h = layers[2].output
            lm.lm_head(lm.model.norm(h)).save()
            lm.lm_head.output.save()

    def invokes():
        with lm.trace() as tracer:
            with tracer.invoke(P1):
                layers[0].output[:] *= 0.5
                lm.lm_head.output.save()
            with tracer.invoke([SHORT, MID]):
                lm.lm_head.output[:, -1].save()
            with tracer.invoke():  # no input: sees this trace's rows, all of them
                lm.lm_head.output.sum(-1).save()
            lm.lm_head.output.max().save()  # outside invokes: all of this trace's rows

    def stop():
        with lm.trace(MID) as tracer:
            layers[0].output.save()
            tracer.stop()
            lm.lm_head.output.save()

    def skip():
        with lm.trace(P1):
            layers[1].skip(layers[1].input)
            lm.lm_head.output.save()

    def result():
        with lm.trace(SHORT) as tracer:
            tracer.result.logits.save()

    def logs():
        with lm.trace(P3):
            client_sdk.log("mean", layers[1].output.mean())
            layers[1].output.norm().save()

    return {"reads": reads, "edits": edits, "in_place": in_place, "module_calls": module_calls,
            "invokes": invokes, "stop": stop, "skip": skip, "result": result, "logs": logs}


KINDS = ["reads", "edits", "in_place", "module_calls", "invokes", "stop", "skip", "result", "logs"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_trace_batched_with_other_requests_gives_what_it_gives_alone(lm: LanguageModel, kind: str) -> None:
    with torch.no_grad():
        mine = record(kinds(lm)[kind])
        rest = others(lm)
        got = batched(lm, [rest[0], mine, *rest[1:]])
        assert_same(got[1], alone(lm, mine))
        for g, rec in zip([got[0], *got[2:]], rest, strict=True):
            assert_same(g, alone(lm, rec))  # and it changed nothing of theirs


def test_tracer_cache_batched_gives_what_it_gives_alone(lm: LanguageModel) -> None:
    layers = lm.model.layers

    def cached():
        with lm.trace(MID) as tracer:
            tracer.cache(modules=[layers[1], lm.lm_head], include_inputs=True)
            layers[1].output[:, -1] = 0

    mine = record(cached)
    with torch.no_grad():
        got = batched(lm, [others(lm)[1], mine])[1]
        want = alone(lm, mine)
    assert got.error is None and want.error is None
    # the cache's values are saves of this program: all of them equal to the lone run's
    assert got.saves.keys() == want.saves.keys() and len(want.saves) >= 3
    for k, v in want.saves.items():
        torch.testing.assert_close(got.saves[k], v, rtol=1e-5, atol=1e-6)


def test_equal_greedy_generations_of_fixed_length_batch_and_match_alone(lm: LanguageModel) -> None:
    def gen(prompt: str, steer: float):
        def body():
            with lm.generate(prompt, max_new_tokens=3, min_new_tokens=3) as tracer:
                for _ in tracer.iter[0:3]:
                    lm.model.layers[1].output[:, -1] += steer
                    lm.lm_head.output[:, -1].save()
                tracer.result.save()

        return record(body)

    a, b, c = gen(P1, 0.5), gen(SHORT, 0.0), gen(MID, -1.0)
    assert batch_key(a[0]) is not None and batch_key(a[0]) == batch_key(b[0]) == batch_key(c[0])
    with torch.no_grad():
        got = batched(lm, [a, b, c])
        for g, rec in zip(got, [a, b, c], strict=True):
            assert_same(g, alone(lm, rec))


def test_greedy_generations_that_end_at_different_steps_batch_and_each_ends_as_alone(lm: LanguageModel) -> None:
    """Generations stop at EOS: alone, `generate` stops once all of a program's rows have produced
    it. In one batch each program ends at its own step (its result as long as alone, no event of a
    later step) while the others go on."""
    free = record(lambda: _generate(lm, P1, 6, None, steps=False))
    alone_tokens = alone(lm, free).saves
    (tokens,) = alone_tokens.values()
    width = len(lm.tokenizer(P1)["input_ids"])
    eos = int(tokens[0, width + 1])  # P1's second new token: P1 ends after 2 steps with it as EOS

    recs = [record(lambda p=p, steps=steps: _generate(lm, p, 6, eos, steps))
            for p in (P1, MID, SHORT) for steps in (True, False)]
    assert len({batch_key(t) for t, _ in recs}) == 1 and batch_key(recs[0][0]) is not None
    with torch.no_grad():
        got = batched(lm, recs)
        want = [alone(lm, rec) for rec in recs]
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    lengths = {next(iter(w.saves.values())).shape[1] - len(lm.tokenizer(p)["input_ids"])
               for w, p in zip(want[1::2], (P1, MID, SHORT), strict=True)}
    assert min(lengths) == 2 and max(lengths) > 2, lengths  # they did end at different steps
    assert len(want[0].saves) == 2  # P1's step loop saw its 2 steps only, batched as alone


def _generate(lm: LanguageModel, prompt: str, n: int, eos: int | None, steps: bool) -> None:
    """A greedy generation of up to `n` tokens: each step's last-position logits (`steps`), or
    its tokens (`tracer.result`)."""
    kwargs = {} if eos is None else {"eos_token_id": eos}
    with lm.generate(prompt, max_new_tokens=n, **kwargs) as tracer:
        if steps:
            for _ in tracer.iter[0:n]:
                lm.lm_head.output[:, -1].save()
        else:
            tracer.result.save()


def test_what_cannot_share_a_forward_runs_alone_or_apart(lm: LanguageModel) -> None:
    def grad():
        with lm.trace(P1):
            h = lm.model.layers[1].output
            loss = lm.lm_head.output[0, -1].max()
            with loss.backward():
                h.grad.save()

    def sampled():
        with lm.generate(P1, max_new_tokens=3, min_new_tokens=3, do_sample=True, seed=1):
            lm.lm_head.output.save()

    def beams():
        with lm.generate(P1, max_new_tokens=3, num_beams=2):
            lm.lm_head.output.save()

    def plain(**kwargs):
        def body():
            with lm.trace(P1, **kwargs):
                lm.lm_head.output.save()

        return body

    for alone_kind in (grad, sampled, beams):
        assert batch_key(record(alone_kind)[0]) is None, alone_kind.__name__
    keys = {batch_key(record(plain())[0]), batch_key(record(plain(output_hidden_states=True))[0]),
            batch_key(record(plain(use_cache=False))[0])}
    assert len(keys) == 3  # different forward kwargs: different keys
    # A batch never merges different keys, nor a trace that runs alone with anything.
    recs = [record(plain()), record(grad), record(plain(use_cache=False)), record(plain()), record(plain())]
    queue = FairQueue()
    items = [Waiting(f"u{i}", batch_key(t), 1, 8, t) for i, (t, _) in enumerate(recs)]
    for item in items:
        queue.push(item)
    first = select_batch(queue.order(), BatchLimits())
    assert first == [items[0], items[3], items[4]]
    queue.take(first)
    assert select_batch(queue.order(), BatchLimits()) == [items[1]]  # the gradient trace, alone
    queue.take([items[1]])
    assert select_batch(queue.order(), BatchLimits()) == [items[2]]


def test_gradient_traces_run_alone_and_match(lm: LanguageModel) -> None:
    """A gradient trace is never batched, so what the replica runs for it is the lone run."""

    def grad():
        with lm.trace(P1):
            h = lm.model.layers[1].output
            loss = lm.lm_head.output[0, -1].max()
            with loss.backward():
                h.grad.save()

    rec = record(grad)
    queue = FairQueue()
    item = Waiting("a", batch_key(rec[0]), 1, 8, rec)
    other = Waiting("b", batch_key(others(lm)[0][0]), 1, 8)
    queue.push(item)
    queue.push(other)
    assert select_batch(queue.order(), BatchLimits()) == [item]
    got = alone(lm, rec)
    assert got.error is None and got.saves[max(got.saves)].abs().sum() > 0


def test_one_programs_error_stop_and_cancel_leave_the_others_intact(lm: LanguageModel) -> None:
    def failing():
        with lm.trace(P3):
            lm.model.layers[1].output[:, 100].save()  # IndexError: 8 positions

    def stopping():
        with lm.trace(MID) as tracer:
            lm.model.layers[0].output.save()
            tracer.stop()
            lm.lm_head.output.save()

    def cancelled():
        with lm.trace(P1):
            lm.model.layers[0].output.save()
            client_sdk.log("layer 0 ran")  # its log handler sets its cancel flag: mid-forward
            lm.model.layers[1].output[:] = 1e6  # never runs
            lm.lm_head.output.save()

    rest = others(lm)
    recs = [record(failing), rest[0], record(stopping), rest[1], record(cancelled), rest[2]]
    with torch.no_grad():
        got = batched(lm, recs, cancels={4: threading.Event()})
        failed, stopped, was_cancelled = got[0], got[2], got[4]
        assert isinstance(failed.error, ExecutionError) and "IndexError" in failed.error.message
        assert stopped.error is None and stopped.stopped == "trace" and len(stopped.saves) == 1
        assert isinstance(was_cancelled.error, Cancelled) and was_cancelled.saves == {}
        for g, rec in zip([got[1], got[3], got[5]], rest, strict=True):
            assert_same(g, alone(lm, rec))


def test_a_program_cannot_reach_beyond_its_rows(lm: LanguageModel) -> None:
    """Row 1 of the batch belongs to the other request: for this one it does not exist."""

    def grabby():
        with lm.trace(P1):
            lm.model.layers[1].output[1] = 0  # this trace has one row
            lm.lm_head.output.save()

    victim = others(lm)[0]
    with torch.no_grad():
        got = batched(lm, [record(grabby), victim])
        assert isinstance(got[0].error, ExecutionError) and "IndexError" in got[0].error.message
        assert_same(got[1], alone(lm, victim))


# -- the fair order and batch selection -------------------------------------------------------------


def _items(users: str, key: object = "k", rows: int = 1, width: int = 4) -> list[Waiting]:
    return [Waiting(u, key, rows, width, f"{u}{i}") for i, u in enumerate(users)]


def test_the_fair_order_is_a_round_robin_over_users() -> None:
    queue = FairQueue()
    for item in _items("AAAABBC"):
        queue.push(item)
    assert [w.user for w in queue.order()] == list("ABCABAA")


def test_a_burst_of_one_user_does_not_starve_another() -> None:
    """User A submits 40 traces, then B one: B is served by the next batch (the first one that
    forms after it arrived), not after A's burst."""
    queue = FairQueue()
    burst = _items("A" * 40)
    for item in burst[:10]:
        queue.push(item)
    limits = BatchLimits(max_batch_size=8)
    first = select_batch(queue.order(), limits)
    queue.take(first)  # running while the rest arrives
    for item in burst[10:]:
        queue.push(item)
    b = Waiting("B", "k", 1, 4, "B")
    queue.push(b)
    assert queue.order().index(b) == 1  # second in line: after A's first, before A's second
    second = select_batch(queue.order(), limits)
    assert b in second and first[0].user == "A"
    # Another B trace after B was served goes behind A's next one only (turns rotate).
    queue.take(second)
    b2 = Waiting("B", "k", 1, 4, "B2")
    queue.push(b2)
    assert queue.order().index(b2) == 1 and queue.order()[0].user == "A"


def test_served_users_move_to_the_back_of_the_turn_order() -> None:
    queue = FairQueue()
    for item in _items("AABBCC"):
        queue.push(item)
    queue.take(select_batch(queue.order(), BatchLimits(max_batch_size=2)))  # A's and B's first
    assert [w.user for w in queue.order()] == list("CABC")


def test_batches_respect_rows_and_tokens() -> None:
    queue = FairQueue()
    wide = Waiting("A", "k", 2, 100, "wide")
    small = [Waiting(u, "k", 1, 10, u) for u in "BCDEFG"]
    for item in [wide, *small]:
        queue.push(item)
    # 2x100 + rows of 10: the tokens limit counts rows x the longest row
    got = select_batch(queue.order(), BatchLimits(max_batch_size=16, max_batch_tokens=400))
    assert got == [wide, small[0], small[1]]  # 4 rows x 100 = 400
    got = select_batch(queue.order(), BatchLimits(max_batch_size=3, max_batch_tokens=10**6))
    assert got == [wide, small[0]]
    huge = Waiting("Z", "k", 64, 4096, "huge")  # beyond every limit: runs, alone
    assert select_batch([huge, *small], BatchLimits(max_batch_size=16, max_batch_tokens=1000)) == [huge]


def test_a_cancelled_waiting_trace_leaves_the_queue() -> None:
    queue = FairQueue()
    items = _items("ABA")
    for item in items:
        queue.push(item)
    assert queue.remove(items[1]) and not queue.remove(items[1])
    assert queue.order() == [items[0], items[2]] and len(queue) == 2


def test_trace_size_counts_rows_and_the_longest_prompt(lm: LanguageModel) -> None:
    def body():
        with lm.trace() as tracer:
            with tracer.invoke([P1, SHORT]):
                pass
            with tracer.invoke(MID):
                lm.lm_head.output.save()

    trace, tensors = record(body)
    rows, width = trace_size(lm.tokenizer, trace, tensors)
    assert rows == 3 and width == len(lm.tokenizer(P1)["input_ids"])


def test_the_config_names_the_batching_limits() -> None:
    from pydantic import ValidationError as ConfigError

    from serve_app.config import ModelConfig

    m = ModelConfig(name="m", path="/x", max_batch_size=8, max_batch_tokens=1024, batch_wait_ms=5)
    assert (m.max_batch_size, m.max_batch_tokens, m.batch_wait_ms) == (8, 1024, 5)
    with pytest.raises(ConfigError, match="max_ongoing_requests .* must be at least max_batch_size"):
        ModelConfig(name="m", path="/x", max_ongoing_requests=4, max_batch_size=8)
    with pytest.raises(ConfigError, match="max_batch_size"):
        ModelConfig(name="m", path="/x", max_batch_size=0)


def test_the_replica_scheduler_serves_users_in_turn_and_reports_places(lm: LanguageModel) -> None:
    """actors/batcher.py in-process (asyncio, no Ray): while a batch holds the forward thread, A's
    five traces and then B's one wait; B is second in line (QUEUED position 2: behind A's first,
    the running batch counting as 1) and runs in the very next batch."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from actors.batcher import Batcher

    gate = threading.Event()

    def held():
        with lm.trace(P1):
            client_sdk.log("hold")  # its log handler waits for the gate: the forward thread is busy
            lm.lm_head.output.save()

    def small(prompt: str):
        def body():
            with lm.trace(prompt):
                lm.lm_head.output[:, -1].save()

        return record(body)

    events: list[tuple] = []

    async def main() -> dict[str, ProgramResult]:
        pool = ThreadPoolExecutor(max_workers=1)
        batcher = Batcher(lm.local_module, lm.tokenizer, BatchLimits(max_batch_size=2, batch_wait_ms=0), pool)

        def submit(name: str, user: str, rec: Recorded, on_log=lambda m: None):
            program = Program(rec[0], tensors=rec[1], on_log=on_log)
            return asyncio.ensure_future(batcher.run(
                user, program, lambda n, size: events.append(("RUNNING", name, n, size)),
                lambda pos: events.append(("QUEUED", name, pos))))

        runs = {"hold": submit("hold", "X", record(held), on_log=lambda m: gate.wait())}
        while batcher.running == 0:
            await asyncio.sleep(0.01)
        for i in range(5):
            runs[f"a{i}"] = submit(f"a{i}", "A", small(P1))
            await asyncio.sleep(0)
        runs["b"] = submit("b", "B", small(P3))
        await asyncio.sleep(0)
        assert batcher.stats()["waiting"] == 6 and batcher.stats()["running"] == 1
        gate.set()
        out = {name: await task for name, task in runs.items()}
        pool.shutdown()
        return out

    with torch.no_grad():
        results = asyncio.run(main())
    assert all(r.error is None for r in results.values())
    started = {e[1]: e[2] for e in events if e[0] == "RUNNING"}
    assert started["hold"] == 1 and started["a0"] == 2 and started["b"] == 2  # B: the next batch
    assert [started[f"a{i}"] for i in range(5)] == [2, 3, 3, 4, 4]
    first_place = {}
    for e in events:
        if e[0] == "QUEUED":
            first_place.setdefault(e[1], e[2])
    assert first_place["b"] == 2 and first_place["a0"] == 1 and first_place["a1"] == 2  # a1 then moved back
    assert ("QUEUED", "a1", 3) in events  # B, who arrived later, went ahead of A's second
    want = alone(lm, small(P3))
    torch.testing.assert_close(results["b"].saves[max(want.saves)], want.saves[max(want.saves)], rtol=1e-5, atol=1e-6)


class _Chain:
    """A request's traces for Batcher.run_chain: notes the thread that makes each program and the
    order things start in (`events`, shared between chains)."""

    def __init__(self, name: str, recs: list[Recorded], events: list[tuple], on_log=lambda m: None):
        self.name, self.recs, self.events, self.on_log = name, list(recs), events, on_log
        self.made_in: list[str] = []  # the thread of each next() call
        self.results: list[ProgramResult] = []

    def next(self):
        self.made_in.append(threading.current_thread().name)
        if not self.recs:
            return None
        index = len(self.made_in)
        trace, tensors = self.recs.pop(0)
        program = Program(trace, tensors=tensors, on_log=self.on_log)
        return program, lambda batch, size: self.events.append(("RUNNING", self.name, index, batch))

    def record(self, program: Program, result: ProgramResult) -> None:
        self.results.append(result)

    def on_queued(self, position: int) -> None:
        self.events.append(("QUEUED", self.name, position))


def test_a_lone_requests_traces_follow_each_other_in_the_forward_thread(lm: LanguageModel) -> None:
    """actors/batcher.py: while the replica serves one request, the forward thread makes and runs
    its next trace itself (no hop back to the event loop); once another request waits, the chain
    goes back to the fair queue, so the other's trace runs before the chain's next one."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from actors.batcher import Batcher

    def small(prompt: str) -> Recorded:
        def body():
            with lm.trace(prompt):
                lm.lm_head.output[:, -1].save()

        return record(body)

    gate = threading.Event()

    def held() -> None:
        with lm.trace(P1):
            client_sdk.log("hold")  # its log handler waits for the gate: the forward thread is busy
            lm.lm_head.output[:, -1].save()

    events: list[tuple] = []
    alone = _Chain("alone", [small(P1), small(P3), small(MID)], events)
    first = _Chain("A", [record(held), small(P3), small(MID)], events, on_log=lambda m: gate.wait())
    other = _Chain("B", [small(P3)], events)

    async def main() -> None:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        batcher = Batcher(lm.local_module, lm.tokenizer, BatchLimits(max_batch_size=1, batch_wait_ms=0), pool)

        async def serve(chain: _Chain) -> None:
            with batcher.request():
                await batcher.run_chain(chain.name, chain)

        await serve(alone)
        assert batcher.stats()["batches"] == 3
        a = asyncio.ensure_future(serve(first))
        while batcher.running == 0:
            await asyncio.sleep(0.01)
        b = asyncio.ensure_future(serve(other))  # comes while A's first trace holds the forward thread
        while not any(e[:2] == ("QUEUED", "B") for e in events):
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(a, b)
        pool.shutdown()

    with torch.no_grad():
        asyncio.run(main())
    # made: trace 1 in the loop, traces 2 and 3 in the forward thread, which also saw the end
    assert alone.made_in[0] == "MainThread" and all(t.startswith("forward") for t in alone.made_in[1:4])
    assert len(alone.results) == 3 and all(r.error is None for r in alone.results)
    started = [e[1:3] for e in events if e[0] == "RUNNING"]
    assert started[:3] == [("alone", 1), ("alone", 2), ("alone", 3)]
    assert started[3:5] == [("A", 1), ("B", 1)]  # B, waiting when A's first trace ended, went next
    assert first.made_in[1] == "MainThread"  # A's second trace was made in the loop and queued
    assert ("A", 2) in started[5:] and len(first.results) == 3 and len(other.results) == 1

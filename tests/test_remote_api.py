"""The HTTP API of the real local cluster: auth, ownership, validation before queueing, limits,
model metadata, the OpenAPI document, and that intermediates stay in the cluster."""

from __future__ import annotations

import inspect
from pathlib import Path

import httpx
import pytest
import torch
from remote_helpers import (
    P1,
    P2,
    heavy_body,
    no_leftover_requests,  # noqa: F401 - a fixture used below
    one_thread,
    record,
    rewrite,
    slow_session,
)

from client_sdk import LanguageModel
from client_sdk.remote import RemoteError
from intervention.tokenizer import load_tokenizer
from intervention.wire import decode_result

pytestmark = pytest.mark.usefixtures("remote_client", "no_leftover_requests")
HERE = str(Path(__file__).resolve())



def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"code", "message", "location"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# -- auth and ownership ----------------------------------------------------------------------------


def test_healthz_needs_no_key(cluster) -> None:
    r = httpx.get(f"{cluster.url}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/llama"),
    ("POST", "/v1/requests"),
    ("GET", "/v1/requests/{id}"),
    ("GET", "/v1/requests/{id}/events"),
    ("GET", "/v1/requests/{id}/result"),
    ("DELETE", "/v1/requests/{id}"),
]


@pytest.mark.parametrize("key", [None, "wrong-key", ""], ids=["no-key", "wrong-key", "empty-key"])
def test_every_route_but_health_needs_a_valid_key(cluster, alice, small_body, key) -> None:
    rid = alice.submit(small_body)  # a real id: the 401 must not depend on the id existing
    headers = {} if key is None else {"Authorization": f"Bearer {key}".strip()}
    with httpx.Client(base_url=cluster.url, headers=headers) as http:
        for method, route in ROUTES:
            body = small_body if method == "POST" else None
            r = http.request(method, route.format(id=rid), content=body)
            err = assert_error(r, 401, "unauthorized")
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), route
            assert cluster.keys["alice"] not in r.text
        r = http.get("/v1/models", headers={"Authorization": f"Basic {cluster.keys['alice']}"})
        assert_error(r, 401, "unauthorized")
    assert err["location"] is None
    assert alice.end(rid)[0] == "COMPLETED"  # the refused calls did not touch the request


def test_another_users_request_is_not_found(alice, bob, small_body) -> None:
    rid = alice.submit(small_body)
    assert alice.end(rid)[0] == "COMPLETED"
    for method, route in ROUTES[3:]:
        r = bob.http.request(method, route.format(id=rid))
        err = assert_error(r, 404, "not_found")
        assert "alice" not in err["message"]
    for method, route in ROUTES[3:]:  # the same answer as for an id that never existed
        assert_error(bob.http.request(method, route.format(id="0" * 32)), 404, "not_found")
    assert alice.status(rid)["state"] == "COMPLETED"
    r = alice.result(rid)
    assert r.status_code == 200
    values, _ = decode_result(r.content)
    assert len(values) == 1


# -- validation before queueing --------------------------------------------------------------------


def test_unknown_model_is_404_before_anything_is_queued(alice, small_body) -> None:
    def to_unknown(s):
        s["traces"][0]["model"] = "no-such-model"

    r = alice.http.post("/v1/requests", content=rewrite(small_body, to_unknown))
    err = assert_error(r, 404, "unknown_model")
    assert (
        "no-such-model" in err["message"] and "llama" in err["message"] and "gpt2" in err["message"]
    )
    assert "id" not in r.json()
    # the client's own look-up of an unknown model says the same
    with pytest.raises(RemoteError, match="no-such-model") as exc:
        LanguageModel("no-such-model").model  # noqa: B018
    assert exc.value.status == 404


def _recorded_with_line(llama: LanguageModel) -> tuple[bytes, int]:
    line = 0

    def body():
        nonlocal line
        with llama.trace(P1):
            line = inspect.currentframe().f_lineno + 1
            h = llama.model.layers[1].output.abs()
            h.save()

    return record(body), line


def test_unknown_module_path_is_422_at_the_users_line(alice, llama) -> None:
    body, line = _recorded_with_line(llama)

    def bad_path(s):
        node = next(n for n in s["traces"][0]["nodes"] if n["op"] == "module.output")
        node["args"][0] = "model.layers.17"

    err = assert_error(alice.http.post("/v1/requests", content=rewrite(body, bad_path)), 422)
    assert "model.layers.17" in err["message"]
    assert err["location"]["file"] == HERE and err["location"]["line"] == line, err


@pytest.mark.parametrize(
    "edit",
    [
        lambda n: n.update(op="exec"),  # not an op at all
        lambda n: n["args"].__setitem__(0, "numpy"),  # a tensor method not on the whitelist
        lambda n: n.update(op="function", args=["builtins.eval", "1+1"]),  # a function not on it
    ],
    ids=["unknown-op", "method-numpy", "function-eval"],
)
def test_unsupported_op_is_422_at_the_users_line(alice, llama, edit) -> None:
    body, line = _recorded_with_line(llama)

    def bad_op(s):
        edit(next(n for n in s["traces"][0]["nodes"] if n["op"] == "method"))

    err = assert_error(alice.http.post("/v1/requests", content=rewrite(body, bad_op)), 422)
    assert err["location"]["file"] == HERE and err["location"]["line"] == line, err


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not a safetensors file at all",
        b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}',
        b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
    ],
    ids=["empty", "garbage", "bad-header", "no-session"],
)
def test_malformed_body_is_422(alice, body) -> None:
    assert_error(alice.http.post("/v1/requests", content=body), 422)


def test_malformed_session_json_is_422(alice, small_body) -> None:
    def break_it(s):
        s["traces"][0]["nodes"][0]["args"] = {"not": "a list"}
        s["traces"].append({"model": "llama"})

    assert_error(alice.http.post("/v1/requests", content=rewrite(small_body, break_it)), 422)


def test_bad_timeout_header_is_422_and_leaves_no_request_behind(alice, small_body) -> None:
    # more than the per-user cap: none of them may count against it
    for bad in ("soon", "0", "-3", "nan", "inf"):
        r = alice.http.post(
            "/v1/requests", content=small_body, headers={"X-Raysight-Timeout": bad}
        )
        assert_error(r, 422, "invalid_request")
        assert "positive number of seconds" in r.json()["error"]["message"]
    rid = alice.submit(small_body)
    assert alice.end(rid)[0] == "COMPLETED"


def test_oversized_body_is_413(alice, cluster) -> None:
    big = b"\0" * (8 * 2**20 + 1)
    assert_error(alice.http.post("/v1/requests", content=big), 413, "too_large")

    def chunks():  # no Content-Length: the server must count while reading
        for _ in range(9):
            yield b"\0" * 2**20

    assert_error(alice.http.post("/v1/requests", content=chunks()), 413, "too_large")


def test_a_client_tensor_over_the_limit_is_413_from_the_sdk(llama) -> None:
    big = torch.zeros(2 * 2**20 + 1)  # > 8 MiB as float32
    with pytest.raises(RemoteError) as exc, llama.trace(P1, remote=True):
        (llama.model.layers[0].output[0, -1, 0] + big).max().save()
    assert exc.value.status == 413 and exc.value.code == "too_large"


# -- the per-user cap ------------------------------------------------------------------------------


def test_per_user_cap_is_429(alice, bob, llama, small_body) -> None:
    slow = heavy_body(llama)  # one long trace: the others stay queued behind it (not batched in)
    held = []
    try:
        for _ in range(3):
            held.append(alice.submit(slow))
        err = assert_error(
            alice.http.post("/v1/requests", content=small_body), 429, "too_many_requests"
        )
        assert "3" in err["message"]
        # a queued one reports its place in the queue
        alice.wait_for(held[2], lambda k, d: k == "QUEUED")
        status = alice.status(held[2])
        assert status["state"] == "QUEUED" and status["queue_position"] >= 1, status
        # the cap is per user
        other = bob.submit(small_body)
        bob.cancel(other)
        assert bob.end(other)[0] in ("CANCELLED", "COMPLETED")
    finally:
        for rid in held:
            alice.cancel(rid)
        ends = [alice.end(rid)[0] for rid in held]
    assert ends == ["CANCELLED"] * 3
    rid = alice.submit(small_body)  # the slots are free again
    assert alice.end(rid)[0] == "COMPLETED"


# -- models and metadata ---------------------------------------------------------------------------


def test_models_are_listed(alice) -> None:
    r = alice.http.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()}
    assert set(models) == {"llama", "gpt2"}
    for m in models.values():
        assert m["replicas"] >= 1 and m["state"] == "HEALTHY" and m["queue_length"] >= 0, m


def test_model_info_is_all_a_client_needs(alice, cluster, tmp_path) -> None:
    for name, path in (("llama", cluster.llama_path), ("gpt2", cluster.gpt2_path)):
        r = alice.http.get(f"/v1/models/{name}")
        assert r.status_code == 200
        info = r.json()
        assert info["name"] == name
        assert info["config"]["hidden_size" if name == "llama" else "n_embd"] == 64
        assert info["config"]["model_type"] == name
        assert "lm_head" in str(info["module_tree"])
        assert "tokenizer.json" in info["tokenizer_files"]
        folder = tmp_path / name
        folder.mkdir()
        for fname, text in info["tokenizer_files"].items():
            (folder / fname).write_text(text, encoding="utf-8")
        served, local = load_tokenizer(folder), load_tokenizer(path)
        assert served(P1)["input_ids"] == local(P1)["input_ids"]
        assert (
            served([P1, "Paris"], padding=True)["input_ids"]
            == local([P1, "Paris"], padding=True)["input_ids"]
        )
    assert_error(alice.http.get("/v1/models/nope"), 404, "unknown_model")
    # the SDK builds the same tokenizer from the server
    lm = LanguageModel("gpt2")
    assert lm.tokenizer.decode(lm.tokenizer(P2)["input_ids"]) == P2


def test_openapi_lists_the_routes(cluster) -> None:
    spec = httpx.get(f"{cluster.url}/openapi.json").json()
    paths = spec["paths"]
    assert {"get"} <= set(paths["/healthz"]) and {"get"} <= set(paths["/v1/models"])
    assert "get" in paths["/v1/models/{name}"]
    assert "post" in paths["/v1/requests"]
    assert {"get", "delete"} <= set(paths["/v1/requests/{request_id}"])
    assert "get" in paths["/v1/requests/{request_id}/events"]
    assert "get" in paths["/v1/requests/{request_id}/result"]
    docs = httpx.get(f"{cluster.url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# -- the request lifecycle over raw HTTP -----------------------------------------------------------


def test_status_events_and_result_over_http(alice, small_body) -> None:
    rid = alice.submit(small_body)
    events = list(alice.events(rid))
    kinds = [k for k, _ in events]
    assert kinds[0] == "RECEIVED" and kinds[-1] == "COMPLETED" and "RUNNING" in kinds, kinds
    running = next(d for k, d in events if k == "RUNNING")
    assert running["trace"] == 1 and running["of"] == 1 and running["model"] == "llama"
    # resuming after an event id replays only what came after it
    assert [k for k, _ in alice.events(rid, after=0)] == kinds[1:]
    status = alice.status(rid)
    assert status["state"] == "COMPLETED" and status["traces"] == 1 and status["error"] is None
    assert status["result_available"] is True
    r = alice.result(rid)
    assert r.status_code == 200
    values, _ = decode_result(r.content)
    (token,) = values.values()
    assert token.dtype == torch.long and token.dim() == 0
    # cancelling a finished request changes nothing
    assert alice.cancel(rid)["state"] == "COMPLETED"
    assert alice.status(rid)["state"] == "COMPLETED"


def test_result_of_a_request_that_has_none_is_409(alice, llama) -> None:
    rid = alice.submit(slow_session(llama, 60))
    alice.wait_for(rid, lambda k, d: k == "RUNNING")
    err = assert_error(alice.result(rid), 409, "not_ready")
    assert err["message"] == "the request is RUNNING: its result is not ready yet"
    alice.cancel(rid)
    assert alice.end(rid)[0] == "CANCELLED"
    err = assert_error(alice.result(rid), 409, "not_ready")  # the code stays; the message says why
    assert err["message"] == "the request was CANCELLED: it has no result"


# -- intermediates stay in the cluster -------------------------------------------------------------


def test_intermediates_stay_in_the_cluster(alice, llama, tiny_llama_path) -> None:
    """Trace 1 sums every layer's output over a long batch (MBs); trace 2 uses the sum. Only the
    saved tokens come back: every byte the client receives is a small fraction of that."""
    long_prompt = " ".join(["The Eiffel Tower is in the city of Paris and"] * 20)
    batch = [long_prompt] * 16

    def session(lm):
        with lm.trace(batch):
            acc = 0
            for layer in lm.model.layers:
                acc = acc + layer.output
        with lm.trace(P2):
            lm.model.layers[1].output[:, -1, :] = acc.mean(dim=(0, 1))
            return lm.lm_head.output[0].argmax(dim=-1).save()

    body = record(lambda: session(llama))
    tokens = len(llama.tokenizer(long_prompt)["input_ids"])
    layer_bytes = len(batch) * tokens * 64 * 4
    intermediates = 5 * layer_bytes  # four layer outputs and their sum

    received = 0
    r = alice.http.post("/v1/requests", content=body)
    assert r.status_code == 202
    received += len(r.content)
    rid = r.json()["id"]
    with alice.http.stream("GET", f"/v1/requests/{rid}/events") as s:
        for chunk in s.iter_bytes():
            received += len(chunk)
    assert alice.status(rid)["state"] == "COMPLETED"
    r = alice.result(rid)
    received += len(r.content)
    values, _ = decode_result(r.content)
    (tokens_out,) = values.values()
    assert tokens_out.shape == (7,)
    assert layer_bytes > 2**19 and received < intermediates / 50, (received, intermediates)

    # The one-round-trip path a blocking client uses (events and the result inline in the
    # submit's response): everything it receives is small too, and holds the same tokens.
    headers = {"Accept": "text/event-stream", "Content-Type": "application/octet-stream"}
    streamed, last = 0, b""
    with alice.http.stream("POST", "/v1/requests", content=body, headers=headers) as s:
        assert s.status_code == 202
        for chunk in s.iter_bytes():
            streamed += len(chunk)
            last = (last + chunk)[-4 * 2**20 :]
    assert b"COMPLETED" in last and streamed < intermediates / 50, (streamed, intermediates)

    # and the client gets the local value
    lm = LanguageModel(str(tiny_llama_path))
    with one_thread(), lm.session():
        local = session(lm)
    assert isinstance(local, torch.Tensor) and torch.equal(local, tokens_out)


def test_two_handles_on_one_served_model_share_a_session(llama) -> None:
    """Two `LanguageModel("llama")` objects name the same served model: a session using both
    runs on it (a local session renames the second copy of a folder, the server must not)."""
    other = LanguageModel("llama")
    with llama.session(remote=True):
        with llama.trace(P2):
            first = llama.model.layers[0].output.save()
        with other.trace(P2):
            second = other.model.layers[0].output.save()
    assert torch.equal(first, second)

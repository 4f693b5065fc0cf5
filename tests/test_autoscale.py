"""Autoscaling on the session's real cluster: a second raysight app ("scaled", under /scaled) whose
model has an `autoscaling_config` (min 1, max 3, short delays). Load from several clients makes
Serve run >= 2 replicas; with the load down to one client Serve goes back to 1, and every request
accepted meanwhile ends COMPLETED with the right values: a replica being stopped drains its
requests first (no RETRYING, which a killed replica would cause). `GET /v1/models` reports the
live replica count and the queue summed over the replicas.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import ray
import torch
from remote_helpers import P1, P2, P3, Api, api, one_thread, record, slow_traces

from client_sdk import CONFIG, LanguageModel
from intervention.wire import decode_result
from serve_app.config import AppConfig, hash_key

APP = "scaled"
MODEL = "scaled-llama"
KEY = "scale-key-8910"
AUTOSCALING = {
    "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
    "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2,
}
PROMPTS = (P1, P2, P3)
# Ray 2.60 still honours metrics_interval_s (its replacement, an environment variable, would have
# to be set before Serve starts): keep the short interval, not the warning.
pytestmark = pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")


@pytest.fixture(scope="module")
def scaled(cluster, tiny_llama_path, tmp_path_factory) -> Iterator[str]:
    """The autoscaled app on the session's Ray + Serve; deleted afterwards."""
    from ray import serve
    from ray.serve.api import RunTarget

    from serve_app import launcher
    from serve_app.app import build_app

    config = AppConfig.model_validate({
        "models": [{"name": MODEL, "path": str(tiny_llama_path), "max_ongoing_requests": 4,
                    # one trace per forward: `running` >= 2 then comes only from the sum over replicas
                    "max_batch_size": 1, "autoscaling_config": AUTOSCALING}],
        "auth": {"api_keys": [{"user": "carol", "key_sha256": hash_key(KEY)}]},
        "limits": {"max_concurrent_per_user": 32, "request_timeout_s": 120},
        "state_dir": str(tmp_path_factory.mktemp("scaled-state")),
    })
    quiet = {"enable_access_log": False}
    target = RunTarget(target=build_app(config.model_dump()), name=APP, route_prefix=f"/{APP}", logging_config=quiet)
    serve.run_many([target], wait_for_applications_running=False)
    url = f"{cluster.url}/{APP}"
    try:
        launcher.wait_ready(url, 120, app_name=APP)
        yield url
    finally:
        serve.delete(APP)


@dataclass
class Load:
    """Client threads that each submit a request, wait for its end, check it, and go again."""

    url: str
    bodies: list[bytes]
    expected: list[torch.Tensor]
    outcomes: list[tuple[str, list[str], bool]] = field(default_factory=list)  # (end, events, right value)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[tuple[threading.Thread, threading.Event]] = field(default_factory=list)

    def add(self, n: int) -> None:
        for _ in range(n):
            stop = threading.Event()
            t = threading.Thread(target=self._client, args=(stop, len(self.threads)), daemon=True)
            self.threads.append((t, stop))
            t.start()

    def stop(self, keep: int = 0) -> None:
        """Let all but `keep` clients finish their current request and stop."""
        for t, stop in self.threads[keep:]:
            stop.set()
        for t, _ in self.threads[keep:]:
            t.join(timeout=120)
            assert not t.is_alive(), "a client's request never ended"
        del self.threads[keep:]

    def _client(self, stop: threading.Event, index: int) -> None:
        with api(self.url, KEY) as a:
            i = index
            while not stop.is_set():
                which = i % len(self.bodies)
                rid = a.submit(self.bodies[which])
                events = [k for k, _ in a.events(rid)]
                right = False
                if events[-1] == "COMPLETED":
                    values, _ = decode_result(a.result(rid).content)
                    value = values[max(values)]  # the last trace's save: the logits
                    right = torch.allclose(value, self.expected[which], rtol=1e-5, atol=1e-6)
                with self.lock:
                    self.outcomes.append((events[-1], events, right))
                i += 1


def _models(a: Api) -> dict:
    r = a.http.get("/v1/models")
    assert r.status_code == 200, r.text
    (m,) = r.json()
    assert m["name"] == MODEL
    return m


def _replica_actors() -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#model-{MODEL}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _watch(a: Api, until, timeout_s: float, seen: list[dict]) -> dict:
    """Poll /v1/models (no event exists for a replica starting or stopping) until `until(m)`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = _models(a)
        seen.append(m)
        if until(m):
            return m
        time.sleep(0.25)
    raise AssertionError(f"not reached within {timeout_s:g} s; last /v1/models: {seen[-1] if seen else None}")


def test_load_scales_the_model_up_and_idle_brings_it_back_to_min_losing_nothing(scaled, tiny_llama_path) -> None:
    saved = (CONFIG.host, CONFIG.api_key)
    CONFIG.set_host(scaled)
    CONFIG.set_default_api_key(KEY)
    try:
        model = LanguageModel(MODEL)
        bodies = [record(lambda p=p: _slow_request(model, p)) for p in PROMPTS]
    finally:
        CONFIG.host, CONFIG.api_key = saved
    expected = _local_logits(tiny_llama_path)

    with api(scaled, KEY) as a:
        start = _models(a)
        assert start["replicas"] == 1 and start["queue_length"] == 0 and start["running"] == 0, start
        load = Load(scaled, bodies, expected)
        seen: list[dict] = []
        try:
            load.add(6)  # 6 requests in flight against a target of 1 per replica: Serve wants 3
            # Two replicas RUNNING, and busy at once: a replica runs one request at a time, so a
            # `running` of 2 or more is the sum over replicas (one replica's stats would say 1).
            _watch(a, lambda m: m["replicas"] >= 2 and m["running"] >= 2, 120, seen)
            # The load falls to one client, which keeps requests running while Serve scales down.
            load.stop(keep=1)
            _watch(a, lambda m: m["replicas"] == 1 and len(_replica_actors()) == 1, 120, seen)
        finally:
            load.stop()
        idle = _watch(a, lambda m: m["queue_length"] == 0 and m["running"] == 0, 30, seen)
        assert idle["replicas"] == 1 and idle["state"] == "HEALTHY", idle

    assert max(m["replicas"] for m in seen) >= 2
    assert max(m["queue_length"] for m in seen) >= 1, seen  # requests waited in a replica meanwhile
    assert len(load.outcomes) >= 6
    bad = [o for o in load.outcomes if o[0] != "COMPLETED" or not o[2] or "RETRYING" in o[1]]
    assert not bad, f"{len(bad)} of {len(load.outcomes)} requests: {bad[:3]}"


def _slow_request(model, prompt: str) -> None:
    """~0.5 s of replica time (a matmul at every layer), then the last position's logits."""
    slow_traces(model, 6, size=512)
    with model.trace(prompt):
        model.lm_head.output[0, -1].save()


def _local_logits(path) -> list[torch.Tensor]:
    """The same trace run locally (same engine, one thread as in a replica)."""
    local = LanguageModel(str(path))
    out = []
    with one_thread():
        for prompt in PROMPTS:
            with local.trace(prompt):
                logits = local.lm_head.output[0, -1].save()
            out.append(logits)
    return out

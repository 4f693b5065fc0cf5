"""raysight on a real multi-node Ray cluster on this machine: a head node without model resources
and two worker nodes with fake GPUs and a custom resource each (`ray.cluster_utils.Cluster`).

Run in its own process (tests/test_multinode.py does; the test session's process is already the
driver of another Ray cluster); `bench/multinode.py` runs it with more repeats. Checks, in order:

1. placement: the models pinned by `resources` run on their nodes, the model that only asks for a
   GPU runs on a worker (the head has none), nothing runs on the head;
2. the seed session with its two traces on models on different nodes (the intermediate crosses
   nodes through the object store) gives the same numbers as both traces on one node, and as
   a local run;
3. removing the worker node under a running request: that request's replica dies with the node,
   the session runner (on the head) retries the session once on a replica Serve brings back on
   the remaining node, the request ends COMPLETED with the right value, and the next one too.

Writes what it saw and measured as JSON to --out; exits non-zero, with the reason on stderr, when
a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.pop("RAY_ADDRESS", None)  # never the parent's cluster

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch
from remote_helpers import P1, P2, api, one_thread, record, slow_traces

import client_sdk
from client_sdk import CONFIG, LanguageModel
from intervention.wire import decode_result

APP = "raysight"
KEY = "multinode-key-1357"
# Model name -> (custom resources, where it must run): "a"/"b" pin a model to one worker node.
MODELS = {"llama-a": {"node_a": 1}, "llama-b": {"node_b": 1}, "llama-ha": {}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failed(AssertionError):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


def start(tmp: Path) -> tuple[Any, dict[str, Any], str]:
    """The cluster, its worker nodes by name, and the app's URL."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.api import RunTarget

    from fixtures.tiny_models import build_tiny_llama
    from serve_app import launcher
    from serve_app.app import build_app
    from serve_app.config import AppConfig, hash_key

    path = build_tiny_llama(tmp / "tiny-llama", seed=0)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "object_store_memory": 100 * 2**20})
    workers = {
        name: cluster.add_node(num_cpus=1, num_gpus=2, resources={f"node_{name}": 1}, node_ip_address="127.0.0.1",
                               object_store_memory=100 * 2**20)
        for name in ("a", "b")
    }
    ray.init(address=cluster.address, log_to_driver=os.environ.get("RAYSIGHT_RAY_LOGS") == "1")
    config = AppConfig.model_validate({
        "models": [{"name": n, "path": str(path), "gpus_per_replica": 1, "resources": r} for n, r in MODELS.items()],
        "auth": {"api_keys": [{"user": "dana", "key_sha256": hash_key(KEY)}]},
        "limits": {"request_timeout_s": 120},
        "state_dir": str(tmp / "state"),
    })
    port = _free_port()
    quiet = {"enable_access_log": False}
    # One HTTP proxy, on the head: every node here shares 127.0.0.1, so one port each would clash.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    serve.run_many([RunTarget(target=build_app(config.model_dump()), name=APP, route_prefix="/", logging_config=quiet)],
                   wait_for_applications_running=False)
    url = f"http://127.0.0.1:{port}"
    launcher.wait_ready(url, 240)
    return cluster, {"path": path, **workers}, url


def models(a) -> dict[str, dict]:
    r = a.http.get("/v1/models")
    check(r.status_code == 200, f"/v1/models answered {r.status_code}: {r.text}")
    return {m["name"]: m for m in r.json()}


def seed_session(first: Any, second: Any) -> None:
    """The seed experiment: the last layer's state at the last position of one prompt on `first`,
    patched into layer 1 of another prompt on `second`."""
    with first.trace(P1):
        hs = first.model.layers[-1].output[:, -1, :]
        first.lm_head.output.argmax(dim=-1).save()
    with second.trace(P2):
        second.model.layers[1].output[:, -1, :] = hs
        second.lm_head.output[0, -1].save()
        second.lm_head.output.argmax(dim=-1).save()


def run(a, body: bytes) -> tuple[list[torch.Tensor], list[str], float]:
    """Submit, wait for the end; the saved values in node order, the events, the seconds."""
    t0 = time.perf_counter()
    rid = a.submit(body)
    events = list(a.events(rid, deadline_s=180))
    seconds = time.perf_counter() - t0
    kinds = [k for k, _ in events]
    check(kinds[-1] == "COMPLETED", f"request ended {events[-1]}, events {kinds}")
    values, _ = decode_result(a.result(rid).content)
    return [values[k] for k in sorted(values)], kinds, seconds


def wait_for(a, what: str, until, timeout_s: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = models(a)
            if until(last):
                return last
        except Exception as exc:  # noqa: BLE001 - the ingress may be busy: look again
            last = repr(exc)
        time.sleep(0.25)
    raise Failed(f"{what}: not within {timeout_s:g} s; last /v1/models: {last}")


def scenario(report: dict[str, Any], repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix="raysight-multinode-") as tmp:
        t0 = time.perf_counter()
        cluster, nodes, url = start(Path(tmp))
        report["start_s"] = round(time.perf_counter() - t0, 2)
        try:
            with api(url, KEY) as a:
                _placement(report, a, cluster, nodes)
                _cross_node(report, a, url, nodes["path"], repeats)
                _remove_node(report, a, cluster, nodes)
        finally:
            import ray

            ray.shutdown()  # not serve.shutdown: a replica pending on the removed node's resource would hold it
            cluster.shutdown()


def _placement(report: dict[str, Any], a, cluster, nodes: dict[str, Any]) -> None:
    ids = {"head": cluster.head_node.node_id, "a": nodes["a"].node_id, "b": nodes["b"].node_id}
    where = {v: k for k, v in ids.items()}
    seen = wait_for(a, "every model on a node", lambda m: all(len(m[n]["nodes"]) == 1 for n in MODELS), 60)
    placed = {n: where.get(seen[n]["nodes"][0], "unknown") for n in MODELS}
    report["placement"] = placed
    check(placed["llama-a"] == "a", f"llama-a asks for node_a but runs on {placed['llama-a']}")
    check(placed["llama-b"] == "b", f"llama-b asks for node_b but runs on {placed['llama-b']}")
    check(placed["llama-ha"] in ("a", "b"), f"llama-ha asks for a GPU but runs on {placed['llama-ha']}")


def _cross_node(report: dict[str, Any], a, url: str, path: Path, repeats: int) -> None:
    """The seed session three ways: traces on two nodes (llama-a, llama-b); on two replicas of one
    node (llama-ha and the pinned model beside it: the same two segments and object-store hop, no
    node crossed); on one replica (one segment, the value never leaves the process)."""
    CONFIG.set_host(url)
    CONFIG.set_default_api_key(KEY)
    beside = {"a": "llama-a", "b": "llama-b"}[report["placement"]["llama-ha"]]
    pairs = {"cross": ("llama-a", "llama-b"), "one_node": (beside, "llama-ha"), "one_replica": ("llama-a", "llama-a")}
    served = {name: LanguageModel(name) for name in MODELS}  # one object per name (a session's models)
    bodies = {variant: record(lambda f=served[first], s=served[second]: seed_session(f, s))
              for variant, (first, second) in pairs.items()}
    values = {variant: run(a, body)[0] for variant, body in bodies.items()}
    check(len(values["cross"]) == 3, f"expected 3 saves, got {len(values['cross'])}")
    for other in ("one_node", "one_replica"):
        check(all(torch.equal(x, y) for x, y in zip(values["cross"], values[other], strict=True)),
              f"the cross-node session's saves differ from the {other} session's")
    expected = _local_saves(LanguageModel(str(path)))  # the same engine in this process
    check(all(torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6)
              for x, y in zip(values["cross"], expected, strict=True)),
          "the cross-node session's saves differ from a local run's")
    report["cross_node_equal"] = True
    report["predictions"] = [int(values["cross"][0][0, -1]), int(values["cross"][2][0, -1])]
    times: dict[str, list[float]] = {variant: [] for variant in bodies}
    order = list(bodies)
    for i in range(repeats):  # interleaved, each first in turn, so drift in the machine's load hits all alike
        for variant in order[i % 3:] + order[:i % 3]:
            times[variant].append(run(a, bodies[variant])[2])
    medians = {k: statistics.median(v) for k, v in times.items()}
    report["seed_session_s"] = {k: round(v, 4) for k, v in medians.items()}
    report["seed_session_min_s"] = {k: round(min(v), 4) for k, v in times.items()}
    report["cross_minus_one_node_s"] = round(medians["cross"] - medians["one_node"], 4)
    report["cross_minus_one_replica_s"] = round(medians["cross"] - medians["one_replica"], 4)
    report["repeats"] = repeats


def _local_saves(local: LanguageModel) -> list[torch.Tensor]:
    with one_thread(), client_sdk.session():
        with local.trace(P1):
            hs = local.model.layers[-1].output[:, -1, :]
            t1 = local.lm_head.output.argmax(dim=-1).save()
        with local.trace(P2):
            local.model.layers[1].output[:, -1, :] = hs
            logits = local.lm_head.output[0, -1].save()
            t2 = local.lm_head.output.argmax(dim=-1).save()
    return [t1, logits, t2]


def _remove_node(report: dict[str, Any], a, cluster, nodes: dict[str, Any]) -> None:
    ids = {nodes["a"].node_id: "a", nodes["b"].node_id: "b"}
    ha = LanguageModel("llama-ha")
    slow = record(lambda: _slow(ha))
    quick = record(lambda: _quick(ha))
    (expected,), _, _ = run(a, quick)
    victim = ids[models(a)["llama-ha"]["nodes"][0]]
    rid = a.submit(slow)
    for kind, data in a.events(rid):
        if kind == "RUNNING" and data.get("trace", 0) >= 2:
            break  # the replica is in the middle of the session
        check(kind not in ("COMPLETED", "ERROR", "CANCELLED"), f"the slow request ended early: {kind} {data}")
    t_removed = time.perf_counter()
    cluster.remove_node(nodes[victim])
    events = list(a.events(rid, deadline_s=180))
    kinds = [k for k, _ in events]
    report["removed_node"] = victim
    report["events_after_removal"] = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]  # runs of one
    retried = [d for k, d in events if k == "RETRYING"]
    check(kinds[-1] == "COMPLETED", f"the request on the removed node ended {events[-1]} (events {kinds})")
    check(len(retried) == 1 and retried[0].get("code") == "replica_failed",
          f"expected one retry after the replica failed, saw {retried}")
    values, _ = decode_result(a.result(rid).content)
    check(torch.equal(values[max(values)], expected), "the retried request's value differs from the model's answer")
    report["request_on_removed_node_s"] = round(time.perf_counter() - t_removed, 2)
    back = wait_for(a, "llama-ha back on the other node",
                    lambda m: m["llama-ha"]["replicas"] >= 1 and len(m["llama-ha"]["nodes"]) >= 1, 120)
    survivor = {"a": "b", "b": "a"}[victim]
    report["replica_back_on"] = [ids.get(n, "unknown") for n in back["llama-ha"]["nodes"]]
    check(report["replica_back_on"] == [survivor], f"llama-ha came back on {report['replica_back_on']}, not {survivor}")
    (after,), kinds, _ = run(a, quick)
    check(torch.equal(after, expected) and "RETRYING" not in kinds, f"the next request: {kinds}")
    report["next_request_ok"] = True


def _slow(model: LanguageModel) -> None:
    slow_traces(model, 40, size=384)
    _quick(model)


def _quick(model: LanguageModel) -> None:
    with model.trace(P1):
        model.lm_head.output[0, -1].save()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each seed session")
    args = parser.parse_args()
    report: dict[str, Any] = {"ok": False}
    try:
        scenario(report, args.repeats)
        report["ok"] = True
    except Failed as failed:
        report["failed"] = str(failed)
        print(f"multinode check failed: {failed}", file=sys.stderr)
    finally:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

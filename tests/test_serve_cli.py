"""`raysight serve` as an operator runs it: real processes, real ports on 127.0.0.1.

Bad paths and a busy port are refused before Ray starts (each run takes about a second). Two
servers boot side by side, once for the module: one serving the tiny Llama (ready line, /readyz,
SIGTERM), one that can never be ready because a model asks for GPUs no machine has (503 with
the model named, no ready line, Ctrl-C while it waits).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

RAYSIGHT = str(Path(sys.executable).parent / "raysight")
KEY = "serve-cli-test-key"
BOOT_S = 240.0  # bound on a server start on a loaded 2-core box (it normally takes 15-30 s)
RAY_STARTED = "Started a local Ray instance"
STACK_DUMP = ("Traceback", "SIGTERM received", "*** ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_serve(*args: str) -> subprocess.CompletedProcess:
    """A `raysight serve` expected to give up at once (it would otherwise serve forever)."""
    cmd = [RAYSIGHT, "serve", "--api-key", KEY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _refused(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """The one `error:` line of a run refused before Ray started."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert RAY_STARTED not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


# -- refused before Ray starts ---------------------------------------------------------------------


def test_missing_model_path_names_model_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    line = _refused(_run_serve("--model", f"mymodel={missing}"))
    assert line == f"error: model 'mymodel': path {missing} does not exist"


def test_config_file_path_errors_name_each_bad_model(tmp_path: Path, tiny_llama_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump({"models": [
        {"name": "good", "path": str(tiny_llama_path)},
        {"name": "typo", "path": "~/.cache/raysight/models/smollm2-135n"},
    ]}))
    line = _refused(_run_serve("--config", str(config)))
    expanded = Path("~/.cache/raysight/models/smollm2-135n").expanduser()
    assert line == f"error: model 'typo': path ~/.cache/raysight/models/smollm2-135n ({expanded}) does not exist"


@pytest.mark.parametrize("case", ["no_config", "bad_config", "no_weights", "a_file"])
def test_folder_that_is_not_a_model_is_refused(case: str, tmp_path: Path, tiny_llama_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    expected = {
        "no_config": f"folder {folder} has no config.json: not a Hugging Face model folder",
        "bad_config": f"cannot read {folder / 'config.json'}: Expecting value: line 1 column 1 (char 0)",
        "no_weights": f"folder {folder} has no weights (*.safetensors or *.bin files)",
        "a_file": f"path {folder / 'config.json'} is a file; give the Hugging Face model folder that holds it",
    }[case]
    (folder / "model.safetensors").write_bytes((tiny_llama_path / "model.safetensors").read_bytes())
    config_json = (tiny_llama_path / "config.json").read_text()
    (folder / "config.json").write_text({"bad_config": "", "no_config": config_json}.get(case, config_json))
    if case == "no_config":
        (folder / "config.json").rename(folder / "config.txt")
    if case == "no_weights":
        (folder / "model.safetensors").unlink()
    path = folder / "config.json" if case == "a_file" else folder
    assert _refused(_run_serve("--model", f"m={path}")) == f"error: model 'm': {expected}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir(mode=0)
    try:
        line = _refused(_run_serve("--model", f"m={folder}"))
    finally:
        folder.chmod(0o700)
    assert line == f"error: model 'm': cannot read folder {folder} (permission denied)"


def test_bare_name_of_a_known_model_says_how_to_fetch_it(tmp_path: Path) -> None:
    result = subprocess.run([RAYSIGHT, "serve", "--api-key", KEY, "--model", "m=smollm2-135m"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    line = _refused(result)
    assert f"path smollm2-135m ({tmp_path / 'smollm2-135m'}) does not exist" in line
    assert "run `raysight models fetch smollm2-135m`" in line


def test_hub_id_not_in_the_cache_is_refused_offline() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest; the server inherits it
    line = _refused(_run_serve("--model", "m=no-such-org/no-such-model"))
    assert line == ("error: model 'm': 'no-such-org/no-such-model' is a Hugging Face Hub id, but HF_HUB_OFFLINE "
                    "is set and it is not in the local Hub cache; give a local folder instead")


def test_busy_port_is_one_line_naming_it(tiny_llama_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _refused(_run_serve("--model", f"m={tiny_llama_path}", "--port", str(port)))
    assert line == f"error: port {port} on 127.0.0.1 is already in use; choose another with --port"


# -- running servers -------------------------------------------------------------------------------


class Stream:
    """The lines of one of a process's pipes, as they are printed (a reader thread feeds them)."""

    def __init__(self, pipe) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)  # the process closed it

    def wait_line(self, wanted) -> str:
        """The first line (printed by now or later) for which `wanted(line)` holds."""
        deadline = time.monotonic() + BOOT_S
        for line in self.seen:
            if wanted(line):
                return line
        while True:
            line = self.queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            assert line is not None, f"the stream ended; it had: {self.seen}"
            self.seen.append(line)
            if wanted(line):
                return line

    def text(self) -> str:
        """Every line printed so far."""
        while not self.queue.empty():
            line = self.queue.get()
            if line is not None:
                self.seen.append(line)
        return "\n".join(self.seen)

    def all(self) -> str:
        """Every line, once the process has closed the pipe."""
        try:
            self.wait_line(lambda ln: False)
        except AssertionError:  # the stream ended: everything is in
            pass
        return "\n".join(self.seen)


@dataclass
class Server:
    """A `raysight serve` process on a free port, its stdout and stderr read as they come."""

    proc: subprocess.Popen
    url: str
    out: Stream
    err: Stream

    @classmethod
    def start(cls, args: list[str]) -> Server:
        port = _free_port()
        proc = subprocess.Popen([RAYSIGHT, "serve", "--api-key", KEY, "--port", str(port), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return cls(proc, f"http://127.0.0.1:{port}", Stream(proc.stdout), Stream(proc.stderr))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def servers(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    folder = tmp_path_factory.mktemp("serve-cli")
    never = folder / "never-ready.yaml"
    never.write_text(yaml.safe_dump({"models": [
        {"name": "llama", "path": str(tiny_llama_path)},
        {"name": "needs-gpus", "path": str(tiny_llama_path), "gpus_per_replica": 64},  # cannot be placed
    ]}))
    # Not ~/.raysight/state: servers and test runs must not share request state.
    started = {
        "ready": Server.start(["--model", f"llama={tiny_llama_path}", "--state-dir", str(folder / "ready")]),
        "never": Server.start(["--config", str(never), "--state-dir", str(folder / "never")]),
    }
    try:
        yield started
    finally:
        for server in started.values():
            server.kill()


def test_ready_line_comes_once_readyz_says_ready(servers: dict[str, Server]) -> None:
    server = servers["ready"]
    line = server.out.wait_line(lambda ln: ln.startswith("raysight is ready at"))
    assert line == f"raysight is ready at {server.url} (models: llama)"
    r = httpx.get(f"{server.url}/readyz")  # no key: health routes are open
    assert r.status_code == 200, r.text
    check, store = r.json()["checks"]
    assert check["name"] == "models" and check["ok"] is True
    assert store["name"] == "store" and store["ok"] is True
    assert [(m["name"], m["ready"], m["replicas"] >= 1) for m in check["models"]] == [("llama", True, True)]
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}


def test_every_port_it_opens_is_on_127_0_0_1(servers: dict[str, Server]) -> None:
    """HTTP (HAProxy), HAProxy's stats and metrics pages (which Serve binds on every interface:
    raysight-haproxy rebinds them), the ingress replica's own HTTP server and Ray's processes."""
    import ipaddress

    import psutil

    server = servers["ready"]
    server.out.wait_line(lambda ln: ln.startswith("raysight is ready at"))
    processes = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    listening = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    ip = ipaddress.ip_address(conn.laddr.ip)
                    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
                    listening[f"{ip}:{conn.laddr.port}"] = process.name()
    assert "haproxy" in listening.values(), listening  # HAProxy is the default ingress
    assert f"127.0.0.1:{server.url.rsplit(':', 1)[1]}" in listening, listening
    # Serve's replicas each bind their inter-deployment gRPC server to [::]:0, hard-coded
    # (ray/serve/_private/replica.py), HAProxy or not: docs/operator.md says to firewall nodes.
    serves_own = {a for a, n in listening.items() if a.startswith(":::") and "ServeReplica" in n}
    assert {a: n for a, n in listening.items() if not a.startswith("127.0.0.1:") and a not in serves_own} == {}


def test_responses_carry_one_request_id_and_no_server_software(servers: dict[str, Server]) -> None:
    server = servers["ready"]
    server.out.wait_line(lambda ln: ln.startswith("raysight is ready at"))
    for path in ("/healthz", "/v1/models"):  # (the second one: 401 without a key)
        headers = httpx.get(f"{server.url}{path}").headers
        assert "server" not in headers and "x-request-id" not in headers, (path, headers)


def test_haproxy_shim_drops_the_response_headers_of_the_http_frontend_only() -> None:
    from serve_app.haproxy_shim import drop_response_headers

    config = "frontend prometheus\n    bind :9101\nfrontend http_frontend\n    bind *:8000\n    acl x\n"
    assert drop_response_headers(config, ("server", "x-request-id")) == (
        "frontend prometheus\n    bind :9101\nfrontend http_frontend\n    bind *:8000\n"
        "    http-response del-header server\n    http-response del-header x-request-id\n    acl x\n")


def test_haproxy_shim_rebinds_only_the_stats_and_metrics_frontends() -> None:
    from serve_app.haproxy_shim import rebind

    config = "frontend prometheus\n    bind :9101\nfrontend http_frontend\n    bind *:8000\nlisten stats\n  bind *:8404\n"
    assert rebind(config, ["8404", "9101"], "127.0.0.1") == (
        "frontend prometheus\n    bind 127.0.0.1:9101\nfrontend http_frontend\n    bind *:8000\n"
        "listen stats\n  bind 127.0.0.1:8404\n")


def test_haproxy_shim_sends_paths_without_a_route_to_serves_python_proxy() -> None:
    from serve_app.haproxy_shim import route_unknown_to

    config = ("    default_backend default_backend\nbackend default_backend\n"
              "    http-request return status 404 content-type text/plain lf-string \"Path not found\"\n"
              "backend http-raysight\n    server a 127.0.0.1:30000 check\n")
    assert route_unknown_to(config, "127.0.0.1:8500") == (
        "    default_backend default_backend\nbackend default_backend\n"
        "    server serve-python-proxy 127.0.0.1:8500\nbackend http-raysight\n    server a 127.0.0.1:30000 check\n")


def test_readyz_is_503_naming_the_model_without_a_replica(servers: dict[str, Server]) -> None:
    server = servers["never"]
    body = _poll_readyz_until(server, lambda b: _ready_models(b) == {"llama": True, "needs-gpus": False})
    assert body["ready"] is False
    check, store = body["checks"]
    assert store["ok"] is True  # the store does not wait for models
    assert check["ok"] is False and "needs-gpus (0 running replicas" in check["message"]
    assert "llama" not in check["message"]
    gpu_model = next(m for m in check["models"] if m["name"] == "needs-gpus")
    assert gpu_model["replicas"] == 0 and gpu_model["state"] != "HEALTHY"
    # `raysight serve` says what it waits for, and has not said it is ready
    server.err.wait_line(lambda ln: ln.startswith("waiting: not ready: ") and "needs-gpus (0 running replicas" in ln)
    assert "ready at" not in server.out.text()


def test_sigterm_and_ctrl_c_stop_cleanly_with_status_0(servers: dict[str, Server]) -> None:
    """SIGTERM to the ready server, Ctrl-C (SIGINT) to the one still waiting for its models; both
    at once, since the ready one takes seconds to drain its replicas."""
    ready, never = servers["ready"], servers["never"]
    ready.out.wait_line(lambda ln: ln == "Ctrl-C to stop.")
    _poll_readyz_until(never, lambda b: "needs-gpus" in _ready_models(b))
    ready.proc.send_signal(signal.SIGTERM)
    never.proc.send_signal(signal.SIGINT)
    for server, name in ((ready, "SIGTERM"), (never, "SIGINT")):
        status = server.proc.wait(timeout=120)
        err = server.err.all()
        assert status == 0, err
        assert f"raysight stopped ({name})" in err
        assert not [m for m in STACK_DUMP if m in err], err
    assert "ready at" not in never.out.all()  # it never claimed to be ready
    with pytest.raises(httpx.ConnectError):  # Ray and Serve went down with it
        httpx.get(f"{ready.url}/healthz")


def _ready_models(body: dict) -> dict[str, bool]:
    models = next((c.get("models") for c in body.get("checks", []) if c["name"] == "models"), None) or []
    return {m["name"]: m["ready"] for m in models}


def _poll_readyz_until(server: Server, done) -> dict:
    """Bounded poll of /readyz from the moment the port opens (no event says a replica is up)."""
    deadline = time.monotonic() + BOOT_S
    last: object = None
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.err.all()
        try:
            r = httpx.get(f"{server.url}/readyz", timeout=10.0)
            last = r.text
            if r.status_code in (200, 503) and r.headers.get("content-type") == "application/json":
                body = r.json()
                assert r.status_code == (200 if body["ready"] else 503), (r.status_code, body)
                if done(body):
                    return body
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise AssertionError(f"/readyz never reached the expected state within {BOOT_S:g} s: {last}")

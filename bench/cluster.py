"""The benchmark's one local cluster: `raysight serve` as a subprocess, and what can be read of it.

- `Server.start()` launches `raysight serve --config FILE --port P` and times it to its ready line
  (cold start: Ray, Serve, every model replica loaded and /readyz answering 200).
- `replica_memory()` reads the peak (VmHWM) and current (VmRSS) resident memory of the model
  replica processes from /proc: the descendants of the server whose title holds
  "ServeReplica:raysight:model-" (so other clusters on the machine are never counted).
- `event_times()` connects a Ray driver to this cluster's GCS (found through the server's own
  gcs_server process) and reads the request store's event log, whose events carry the server's
  `time.time()` stamps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPLICA_TAG = "ServeReplica:raysight:model-"
READY = re.compile(r"raysight is ready at (\S+)")


class Server:
    def __init__(self, config: Path, port: int, log_path: Path, env: dict[str, str]):
        self.config, self.port, self.log_path, self.env = config, port, log_path, env
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.cold_start_s: float | None = None
        self.stop_s: float | None = None
        self._ready = threading.Event()

    def start(self, timeout_s: float = 300.0) -> str:
        exe = Path(sys.executable).with_name("raysight")
        cmd = [str(exe), "serve", "--config", str(self.config), "--port", str(self.port)]
        self._log = self.log_path.open("w")
        t0 = time.perf_counter()
        # Same session as the benchmark, on purpose: with the kernel's autogroup scheduling, CPU is
        # shared fairly between sessions, so a cluster in a session of its own would get a second
        # share of a busy machine and the local runs it is compared with would not.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=self.env)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"raysight serve exited ({self.proc.returncode}); see {self.log_path}")
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"raysight serve not ready after {timeout_s:g} s; see {self.log_path}")
        self.cold_start_s = time.perf_counter() - t0
        return self.url

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            m = READY.search(line)
            if m and not self._ready.is_set():
                self.url = m.group(1)
                self._ready.set()

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGINT (what Ctrl-C sends): `raysight serve` shuts Serve and Ray down, then exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stop_s = time.perf_counter() - t0
        self._log.close()

    # -- processes of this cluster -------------------------------------------------------------

    def descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                out.append(child)
                todo.append(child)
        return out

    def replica_memory(self) -> dict[str, dict]:
        """Model name -> {pid, peak_rss_mb, rss_mb} for each model replica process."""
        out = {}
        for pid in self.descendants():
            cmd = _cmdline(pid)
            if REPLICA_TAG not in cmd:
                continue
            name = cmd.split(REPLICA_TAG, 1)[1].split()[0].split(".")[0]
            status = _status(pid)
            out[name] = {"pid": pid, "peak_rss_mb": status.get("VmHWM"), "rss_mb": status.get("VmRSS")}
        return out

    def cluster_rss_mb(self) -> float:
        """Current RSS of the server and all its descendants (shared pages counted in each)."""
        total = 0.0
        for pid in [self.proc.pid, *self.descendants()]:
            total += _status(pid).get("VmRSS") or 0.0
        return round(total, 1)

    def cpu_ticks(self) -> dict[int, tuple[str, int]]:
        """pid -> (process label, user + system CPU ticks) for the server and its descendants."""
        out = {}
        for pid in [self.proc.pid, *self.descendants()]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[pid] = (_label(_cmdline(pid)), int(fields[11]) + int(fields[12]))
        return out

    def gcs_address(self) -> str | None:
        for pid in self.descendants():
            cmd = _cmdline(pid)
            m = re.search(r"gcs_server .*--log_dir=(\S+)", cmd)
            if m:
                for f in Path(m.group(1)).parent.glob("gcs_server_port_*"):
                    return f"127.0.0.1:{f.read_text().strip()}"
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _label(cmd: str) -> str:
    """A short name for a cluster process: the Ray actor title, or the program."""
    first = cmd.split(" ", 1)[0]
    if first.startswith("ray::"):
        title = re.sub(r"\.[A-Za-z_][A-Za-z0-9_]*$", "", first[5:])  # Ray appends the running method
        return title.replace("ServeReplica:raysight:", "replica:") if title else "ray worker"
    if "raysight" in first and "serve" in cmd:
        return "raysight serve (driver)"
    if "python" in first:
        script = next((w for w in cmd.split()[1:] if w.endswith(".py")), first)
        return Path(script).name
    return Path(first).name or "?"


def _status(pid: int) -> dict[str, float]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = round(int(value.split()[0]) / 1024, 1)  # kB -> MB
    except OSError:
        pass
    return out


def event_times(address: str, user: str, request_ids: list[str], timeout_s: float = 120.0) -> dict:
    """Request id -> [(event, server time, data)], read from the cluster's request store.

    A Ray driver in a subprocess (Ray's auth mode is fixed when it is imported; this process may
    have imported it already): `python -m bench.cluster` reads the ids on stdin."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),  # Ray's token auth
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # 127.0.0.1, not eth0 (ENV.md)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cluster", address, user], input=json.dumps(request_ids),
        check=False, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"event reader exited {proc.returncode}: {proc.stderr[-800:]}")
    last = proc.stdout.strip().splitlines()[-1]  # the JSON line (Ray may print before it)
    return {rid: [tuple(e) for e in ev] for rid, ev in json.loads(last).items()}


def _read_events(address: str, user: str, request_ids: list[str]) -> dict:
    import ray

    from actors.request_store import NAMESPACE, STORE_NAME

    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
    try:
        store = ray.get_actor(STORE_NAME, namespace=NAMESPACE)
        refs = {rid: store.events.remote(rid, user, 0, 0.0) for rid in request_ids}
        out = {}
        for rid, ref in refs.items():
            events = ray.get(ref, timeout=30)
            if events:
                out[rid] = [(e["event"], e["time"], e["data"]) for e in events]
        return out
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(json.dumps(_read_events(sys.argv[1], sys.argv[2], json.loads(sys.stdin.read()))))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a benchmark's own server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Start and stop a local Ray + Serve running raysight, bound to 127.0.0.1.

Used by `raysight serve`, `make demo`, the integration tests and the benchmarks, so all of them run
the very same app the Serve config describes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import httpx

from serve_app import preflight
from serve_app.config import AppConfig

APP_NAME = "raysight"
POLL_S = 0.5  # between two looks at /readyz and Serve's status (each costs the controller a little)
# Serve's controller restarts a dead HTTP proxy only after three failed health checks, one per
# period (10 s by default: ~40 s without HTTP after a proxy dies). Checked each second, a new
# proxy answers within seconds; a check is one cheap actor call. Read by the controller, so it is
# set before Ray starts (cluster.yaml sets it for `ray start`).
PROXY_HEALTH_CHECK_PERIOD_S = "1"
INGRESS_DRAIN_S = 2.0  # see _haproxy_env


def _haproxy_env() -> list[str]:
    """Serve's HAProxy ingress is on unless the operator turned it off
    (RAY_SERVE_ENABLE_HA_PROXY=0; docs/operator.md): HAProxy hands each connection to the ingress
    replica, which serves HTTP itself, instead of Serve's Python proxy actor relaying every
    request and chunk over an actor call (about 5 ms and 6 ms of CPU less per request:
    docs/BENCHMARKS.md). Its binary is `raysight-haproxy` (serve_app/haproxy_shim.py), which keeps
    HAProxy's stats and metrics pages on 127.0.0.1. Those, and Serve's Python proxy kept as
    HAProxy's fallback, bind fixed ports (8404, 9101, 8500, 9500) and HAProxy keeps its files
    under /tmp/haproxy-serve, so a second instance on the machine would fail to start: unless the
    operator chose them, this instance gets free ports and a folder of its own.
    Returns the variables set (Ray's processes take them at ray.init; a `raysight serve` started
    from this process later must not inherit them)."""
    import socket
    import tempfile

    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") != "1":
        return []

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    # Short: Serve adds a 56-character folder, and HAProxy's socket paths are capped at 97.
    folder = tempfile.mkdtemp(prefix="rshp-", dir="/tmp")
    own = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": _shim_path(),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        # Serve's Python proxy stays as HAProxy's fallback server, on fixed ports too.
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/server-state",
        # A stopping ingress replica stays up this long so that HAProxy stops sending it
        # connections (Serve's default, 30 s, made every stop of `raysight serve` 30 s longer;
        # HAProxy learns of a replica leaving within a second).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(INGRESS_DRAIN_S),
    }
    added = [k for k in own if k not in os.environ]
    os.environ.update({k: own[k] for k in added})
    return added


def _shim_path() -> str:
    """The `raysight-haproxy` program installed with this package (next to this Python)."""
    path = os.path.join(os.path.dirname(sys.executable), "raysight-haproxy")
    if not os.access(path, os.X_OK):
        raise preflight.PreflightError(
            f"{path} is missing: reinstall raysight (pip install -e .), or set RAY_SERVE_ENABLE_HA_PROXY=0"
        )
    return path


class StartError(RuntimeError):
    """The app could not start; the message says why in a line or two."""


def start(
    config: AppConfig,
    port: int = 8000,
    num_cpus: int | None = None,
    *,
    timeout_s: float | None = 600.0,
    after_ray_init: Callable[[], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Start Ray and the app; return the base URL once /readyz says every model has a replica.

    Bad model paths and a busy port raise `preflight.PreflightError` before Ray starts; a
    deployment that fails to start raises StartError. `after_ray_init` runs as soon as Ray is up
    (ray.init installs signal handlers of its own); `progress` gets a line whenever what the
    app waits for changes; `timeout_s=None` waits as long as the models take to load."""
    preflight.check_models(config.models)
    preflight.check_port(port)
    prepare_state_dir(config.resolved_state_dir())
    # Without this Ray registers the node on eth0, not 127.0.0.1 (see ENV.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    added = _haproxy_env()
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", PROXY_HEALTH_CHECK_PERIOD_S)
    import ray
    from ray import serve
    from ray.serve.api import RunTarget

    from serve_app.app import build_app

    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=os.environ.get("RAYSIGHT_RAY_LOGS") == "1",
        )
    for key in added:
        os.environ.pop(key)
    if after_ray_init is not None:
        after_ray_init()
    quiet = {"enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    # Not serve.run: it waits for every deployment and raises a long traceback when one fails;
    # /readyz is what clients and load balancers use, so it is what we wait on too.
    target = RunTarget(target=build_app(config.model_dump()), name=APP_NAME, route_prefix="/", logging_config=quiet)
    serve.run_many([target], wait_for_applications_running=False)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout_s, progress)
    return url


def prepare_state_dir(path: str) -> None:
    """Create the request store's folder (state survives restarts there), or say in one line why
    it cannot be used, before Ray starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-check")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise preflight.PreflightError(
            f"state_dir {path} cannot be used ({e.strerror or e}); choose another with --state-dir or state_dir"
        ) from None


def wait_ready(
    url: str,
    timeout_s: float | None = 600.0,
    progress: Callable[[str], None] | None = None,
    app_name: str = APP_NAME,
) -> None:
    """Poll `url`/readyz until 200 (there is no event for a replica coming up); raise StartError
    if a deployment of the Serve app `app_name` failed, or the time is up."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = "the HTTP proxy does not answer yet"
    while True:
        failed = _failed_deployment(app_name)
        if failed:
            raise StartError(failed)
        try:
            r = httpx.get(f"{url}/readyz", timeout=5.0)
            if r.status_code == 200:
                return
            now = _waiting_for(r)
        except httpx.HTTPError:
            now = "the HTTP proxy does not answer yet"
        if now != last and progress is not None:
            progress(f"waiting: {now}")
        last = now
        if deadline is not None and time.monotonic() > deadline:
            raise StartError(f"raysight at {url} was not ready within {timeout_s:g} s: {last}")
        time.sleep(POLL_S)


def _waiting_for(r: httpx.Response) -> str:
    """One line from a non-200 /readyz answer: the failed checks' messages."""
    try:
        checks = r.json()["checks"]
        return "; ".join(c["message"] for c in checks if not c["ok"])
    except (ValueError, KeyError, TypeError):
        return f"/readyz answered {r.status_code}"  # e.g. the proxy before the app has a route


def _failed_deployment(app_name: str) -> str | None:
    """Why the app failed to deploy, in one line naming the deployment; None if it has not."""
    from ray import serve

    from serve_app.readiness import short_message

    app = serve.status().applications.get(app_name)
    if app is None or str(getattr(app.status, "value", app.status)) != "DEPLOY_FAILED":
        return None
    for name, dep in app.deployments.items():
        if str(getattr(dep.status, "value", dep.status)) == "DEPLOY_FAILED":
            what = f"model '{name.removeprefix('model-')}'" if name.startswith("model-") else f"deployment {name}"
            return f"{what} failed to start: {short_message(dep.message)}"
    return f"the app failed to deploy: {short_message(app.message)}"


def stop(drain: bool = True) -> None:
    """Stop Serve, then Ray. `drain=False` skips Serve's graceful shutdown (each replica finishing
    its requests; a replica still waiting for resources is waited on for Serve's whole grace
    period, 20 s): for an app stopped before it was ready, with nothing to drain."""
    if "ray" not in sys.modules:  # never started (e.g. a preflight check failed): nothing to stop
        return
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            if drain:
                serve.shutdown()
        finally:
            ray.shutdown()

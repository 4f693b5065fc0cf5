"""Start and stop a local Ray + Serve running raysight, bound to 127.0.0.1.

Used by `raysight serve`, `make demo`, the integration tests and the benchmarks, so all of them run
the very same app the Serve config describes.
"""

from __future__ import annotations

import os
import time

import httpx

from serve_app.config import AppConfig

APP_NAME = "raysight"


def start(config: AppConfig, port: int = 8000, num_cpus: int | None = None) -> str:
    """Start Ray and the app; return the base URL once /healthz answers and every model loaded."""
    # Without this Ray registers the node on eth0, not 127.0.0.1 (see ENV.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from serve_app.app import build_app

    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=os.environ.get("RAYSIGHT_RAY_LOGS") == "1",
        )
    quiet = {"enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    serve.run(build_app(config.model_dump()), name=APP_NAME, route_prefix="/", logging_config=quiet)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"raysight at {url} did not become healthy within {timeout_s:g} s")
        time.sleep(0.1)  # polling an HTTP port: there is no event to await


def stop() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

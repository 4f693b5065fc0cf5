"""Client configuration: where the server is and which key to use.

    CONFIG.set_host("http://127.0.0.1:8000")   # or env RAYSIGHT_HOST
    CONFIG.set_default_api_key("...")          # or env RAYSIGHT_API_KEY
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class Config:
    host: str = field(default_factory=lambda: os.environ.get("RAYSIGHT_HOST", "http://127.0.0.1:8000"))
    api_key: str | None = field(default_factory=lambda: os.environ.get("RAYSIGHT_API_KEY"))
    # Live status line on the terminal while remote requests run (off when not a terminal).
    show_status: bool = True
    timeout_s: float = 600.0
    # Check each trace's shapes and indexing on meta tensors before it is sent or runs (see
    # client_sdk/scan.py). None: remote sessions only (a local run reports the same error at the
    # same line from the model itself, and the check would double a local trace's overhead);
    # True: every session; False: none. `scan=` on a trace or session decides for it.
    scan: bool | None = None

    def set_host(self, host: str) -> None:
        self.host = host.rstrip("/")

    def set_default_api_key(self, key: str) -> None:
        self.api_key = key


CONFIG = Config()

"""The live status line of a remote request, and where its logs go.

On a terminal, one line on stderr shows the request's state (queue position, trace i of n,
download progress) while logs print above it on stdout, in order. Off a terminal, or with
`CONFIG.show_status = False`, only the logs print.
"""

from __future__ import annotations

import sys
from typing import Self

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner

from client_sdk.config import CONFIG


class StatusLine:
    def __init__(self, request_id: str):
        self.request_id = request_id
        self.console = Console(stderr=True)
        self.live: Live | None = None
        self.spinner = Spinner("dots", text=f"raysight {request_id[:8]}: submitted")

    def __enter__(self) -> Self:
        if CONFIG.show_status and self.console.is_terminal:
            self.live = Live(self.spinner, console=self.console, transient=True, redirect_stdout=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, text: str) -> None:
        if self.live is not None:
            self.spinner.update(text=f"raysight {self.request_id[:8]}: {text}")

    def log(self, message: str) -> None:
        print(message, flush=True, file=sys.stdout)

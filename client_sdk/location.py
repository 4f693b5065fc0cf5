"""Where in the user's code are we? Every node records it so errors can point there."""

from __future__ import annotations

import linecache
import os
import sys

import torch

import intervention

_OURS = tuple(
    os.path.dirname(m.__file__) + os.sep
    for m in (sys.modules["client_sdk"], intervention, torch)
    if m.__file__
)


# file name -> whether it is ours. Every recorded operation walks a few frames; a dict lookup per
# frame is cheaper than a startswith over several prefixes.
_IS_OURS: dict[str, bool] = {}


def _is_ours(file: str) -> bool:
    ours = _IS_OURS.get(file)
    if ours is None:
        ours = _IS_OURS[file] = file.startswith(_OURS)
    return ours


def user_location() -> tuple[str, int, str]:
    """(file, line, code) of the innermost frame outside raysight and torch."""
    frame = sys._getframe(1)
    while frame is not None and _is_ours(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return ("<unknown>", 0, "")
    file, line = frame.f_code.co_filename, frame.f_lineno
    return (file, line, linecache.getline(file, line).strip())

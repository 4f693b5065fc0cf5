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


# Every recorded operation walks a few frames, so both lookups are cached: per file, whether it is
# ours (a dict lookup beats a startswith over several prefixes); per call site — a code object
# and the offset of the instruction calling out of it — the finished location (computing
# `f_lineno` decodes the line table, and linecache costs two calls and a strip).
# The recorder's hottest paths look SITES up themselves (`(id(code), f_lasti)` of the frame they
# know to be the user's at the nearest, then `site[0] is code`), calling `user_location` only on a
# miss: a call of it costs about as much as the lookup.
_IS_OURS: dict[str, bool] = {}
SITES: dict[tuple[int, int], tuple[object, tuple[str, int, str]]] = {}
_SITES = SITES


def user_location(depth: int = 1) -> tuple[str, int, str]:
    """(file, line, code) of the innermost frame outside raysight and torch.

    `depth`: how many frames up (1: the caller) the user's code is at the nearest; callers on hot
    paths that know it skip materializing the frames in between."""
    frame = sys._getframe(depth)
    # The commonest case first: the frame `depth` up is a user call site seen before (only user
    # code's sites are ever cached, so a hit means no frame of ours is in between).
    code = frame.f_code
    site = _SITES.get((id(code), frame.f_lasti))
    if site is not None and site[0] is code:
        return site[1]
    while frame is not None:
        code = frame.f_code
        ours = _IS_OURS.get(code.co_filename)
        if ours is None:
            ours = _IS_OURS[code.co_filename] = code.co_filename.startswith(_OURS)
        if not ours:
            break
        frame = frame.f_back
    if frame is None:
        return ("<unknown>", 0, "")
    key = (id(code), frame.f_lasti)
    site = _SITES.get(key)
    if site is not None and site[0] is code:  # the code object itself: ids of dead ones recur
        return site[1]
    if len(_SITES) > 100_000:  # a long notebook session: bound it
        _SITES.clear()
    file, line = code.co_filename, frame.f_lineno
    loc = (file, line, linecache.getline(file, line).strip())
    _SITES[key] = (code, loc)
    return loc

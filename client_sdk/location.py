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
# `f_lineno` decodes the line table, and linecache costs two calls and a strip). Sites are kept
# per code object: SITES[id(code)] = (code, {f_lasti: location}) — two lookups of ints, where a
# (code id, offset) key cost a tuple made, hashed, compared and freed at every operation. The
# code object itself is kept and checked (`is`): ids of dead ones recur.
# The recorder's hottest paths look SITES up themselves (the frame they know to be the user's at
# the nearest), calling `user_location` only on a miss: a call of it costs about as much.
_IS_OURS: dict[str, bool] = {}
SITES: dict[int, tuple[object, dict[int, tuple[str, int, str]]]] = {}
_MAX_SITES = 100_000  # a long notebook session: bounded (codes, and sites per code)


def user_location(depth: int = 1) -> tuple[str, int, str]:
    """(file, line, code) of the innermost frame outside raysight and torch.

    `depth`: how many frames up (1: the caller) the user's code is at the nearest; callers on hot
    paths that know it skip materializing the frames in between."""
    frame = sys._getframe(depth)
    # The commonest case first: the frame `depth` up is a user call site seen before (only user
    # code's sites are ever cached, so a hit means no frame of ours is in between).
    code = frame.f_code
    site = SITES.get(id(code))
    if site is not None and site[0] is code and (loc := site[1].get(frame.f_lasti)) is not None:
        return loc
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
    site = SITES.get(id(code))
    if site is None or site[0] is not code:
        if len(SITES) > _MAX_SITES:
            SITES.clear()
        site = SITES[id(code)] = (code, {})
    sites = site[1]
    lasti = frame.f_lasti
    loc = sites.get(lasti)
    if loc is None:
        if len(sites) > _MAX_SITES:
            sites.clear()
        file, line = code.co_filename, frame.f_lineno
        loc = sites[lasti] = (file, line, linecache.getline(file, line).strip())
    return loc

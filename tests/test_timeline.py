"""intervention/timeline.py: opt-in marks, one file for every process of the request path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from intervention import timeline


def test_marks_of_several_processes_are_read_back_by_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "timeline.txt"
    monkeypatch.setenv(timeline.ENV, str(path))
    timeline.mark("r1", "ingress.entered", at=100.0)
    code = "from intervention import timeline; timeline.mark('r1', 'replica.start', at=100.5); timeline.mark('r2', 'replica.start', at=101.0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
    timeline.mark("r1", "ingress.entered", at=102.0)  # a repeated label keeps its first time
    assert timeline.read(str(path)) == {"r1": {"ingress.entered": 100.0, "replica.start": 100.5},
                                        "r2": {"replica.start": 101.0}}


def test_without_the_variable_a_mark_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(timeline.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    timeline.mark("r1", "ingress.entered")
    assert list(tmp_path.iterdir()) == []

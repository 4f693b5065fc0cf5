"""The request store's durable state (actors/state_db.py), without Ray: what one process wrote is
what the next one reads, expiry drops rows and files, and the launcher refuses an unusable folder."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from actors.state_db import StateDB
from serve_app import launcher, preflight


def _finished(db: StateDB, rid: str, owner: str = "alice", result: bytes = b"values") -> None:
    db.insert(rid, owner, 1, 1 << 20, 1 << 20)  # with its RECEIVED event
    db.append(db.get(rid), "RUNNING", {"trace": 1, "of": 1}, ("replica", 0))
    db.append(db.get(rid), "LOG", {"message": "hello"}, ("replica", 1), log_bytes=5)
    db.write_result(rid, result)
    db.append(db.get(rid), "COMPLETED", {"bytes": len(result)}, result_bytes=len(result))


def test_a_new_process_reads_what_the_last_one_wrote(tmp_path: Path) -> None:
    first = StateDB(tmp_path)
    _finished(first, "r1")
    first.insert("r2", "alice", 2, 1 << 20, 1 << 20)  # accepted, never finished
    first.close()

    db = StateDB(tmp_path)
    row = db.get("r1")
    assert (row.owner, row.state, row.n_events, row.result_bytes, row.running) == (
        "alice", "COMPLETED", 4, 6, {"trace": 1, "of": 1})
    assert db.events("r1", 0)[0]["data"] == {"id": "r1"}
    assert [e["event"] for e in db.events("r1", 0)] == ["RECEIVED", "RUNNING", "LOG", "COMPLETED"]
    assert db.events("r1", 2)[0]["data"] == {"message": "hello"}
    assert db.read_result("r1") == b"values"
    assert db.next_seq("r1", "replica") == 2
    assert [r.id for r in db.open_requests()] == ["r2"]
    use = db.usage("alice")
    assert (use.active, use.result_bytes, use.log_bytes) == (1, 6, 5)
    db.mark_fetched(db.get("r1"))
    assert db.usage("alice").result_bytes == 0


def test_expiry_drops_fetched_results_then_whole_requests(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    _finished(db, "old")
    _finished(db, "fetched")
    db.mark_fetched(db.get("fetched"))
    now = time.time()
    assert db.expire(now, ttl_s=3600, fetch_grace_s=60) == 0
    assert db.expire(now + 120, ttl_s=3600, fetch_grace_s=60) == 0  # past the grace: result only
    assert db.get("fetched").result_bytes is None and db.read_result("fetched") is None
    assert db.read_result("old") == b"values"  # never fetched: kept until the TTL
    assert db.expire(now + 4000, ttl_s=3600, fetch_grace_s=60) == 2
    assert db.get("old") is None and db.events("old", 0) == [] and db.read_result("old") is None
    assert not list((tmp_path / "results").iterdir())


def test_an_unusable_state_dir_is_refused_before_ray_starts(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(preflight.PreflightError) as exc:
        launcher.prepare_state_dir(str(a_file / "state"))
    assert str(exc.value).startswith(f"state_dir {a_file / 'state'} cannot be used (")
    launcher.prepare_state_dir(str(tmp_path / "new" / "state"))
    assert (tmp_path / "new" / "state").is_dir()

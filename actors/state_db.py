"""Durable request state: an embedded SQLite database plus one file per stored result.

Everything the request store knows lives here, under the `state_dir` of the config, so neither a
dead store actor nor a restarted `raysight serve` loses an accepted request or a finished result.
SQLite in WAL mode with `synchronous=NORMAL` survives a process death (not a power cut) at a few
tens of microseconds per write; result bytes go to files (written to a temporary name, then
renamed: a reader never sees half a file) so the database stays small and the store's memory
does not grow with unfetched results.

Only the request store actor opens it (one writer); nothing here is async or Ray-aware.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from intervention.events import LOG, QUEUED, RETRYING, RUNNING, TERMINAL

DEFAULT_STATE_DIR = "~/.raysight/state"  # the config's `state_dir` unless it names another

_TERMINAL_SQL = "('" + "','".join(sorted(TERMINAL)) + "')"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    n_traces INTEGER NOT NULL,
    state TEXT NOT NULL,
    n_events INTEGER NOT NULL DEFAULT 0,
    queued TEXT,               -- the last QUEUED event's data (JSON)
    running TEXT,              -- the last RUNNING event's data (JSON)
    error TEXT,                -- the ERROR event's data (JSON)
    finished REAL,
    fetched REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result_bytes INTEGER,      -- size of the result file; NULL: no result stored
    log_bytes INTEGER NOT NULL DEFAULT 0,
    logs_capped INTEGER NOT NULL DEFAULT 0,
    max_result_bytes INTEGER NOT NULL,  -- the owner's quotas when the request was admitted
    max_log_bytes INTEGER NOT NULL,
    runner TEXT,               -- the session runner replica running it (its lease: runners.seen)
    since REAL NOT NULL        -- when `runner` was last set or cleared
);
CREATE INDEX IF NOT EXISTS requests_owner ON requests (owner);
CREATE INDEX IF NOT EXISTS requests_open ON requests (state) WHERE state NOT IN {_TERMINAL_SQL};
CREATE TABLE IF NOT EXISTS events (
    request_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    time REAL NOT NULL,
    source TEXT,               -- numbered events: their sender and number (see RequestStore.add_event)
    seq INTEGER,
    PRIMARY KEY (request_id, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held (  -- numbered events that arrived before an earlier one of their sender
    request_id TEXT NOT NULL,
    source TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (request_id, source, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runners (id TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Usage:
    """What one user holds: unfinished requests, unfetched result bytes, stored log bytes."""

    active: int
    result_bytes: int
    log_bytes: int


@dataclass(frozen=True)
class Row:
    id: str
    owner: str
    state: str
    created: float
    n_traces: int
    n_events: int
    finished: float | None
    fetched: float | None
    cancel_requested: bool
    result_bytes: int | None
    log_bytes: int
    logs_capped: bool
    max_result_bytes: int
    max_log_bytes: int
    runner: str | None
    since: float
    # The last QUEUED / RUNNING / the ERROR event's data as JSON text: parsed only by `status`
    # (every event reads the row; few read these).
    queued_json: str | None
    running_json: str | None
    error_json: str | None

    @property
    def queued(self) -> dict | None:
        return json.loads(self.queued_json) if self.queued_json else None

    @property
    def running(self) -> dict | None:
        return json.loads(self.running_json) if self.running_json else None

    @property
    def error(self) -> dict | None:
        return json.loads(self.error_json) if self.error_json else None


_ROW_COLUMNS = (
    "id, owner, state, created, n_traces, n_events, finished, fetched, cancel_requested, result_bytes, "
    "log_bytes, logs_capped, max_result_bytes, max_log_bytes, runner, since, queued, running, error"
)


def _row(values: tuple) -> Row:
    fields = list(values)
    fields[8], fields[11] = bool(fields[8]), bool(fields[11])
    return Row(*fields)


class StateDB:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.results = self.dir / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit; a multi-statement change uses `with self.db:`.
        self.db = sqlite3.connect(self.dir / "requests.sqlite3", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable across a process death
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)
        # Per-owner usage, kept up to date by this (the only) writer so admitting a request does
        # not sum over every request the owner has stored; loaded per owner on first use and
        # dropped on expiry, which changes many rows at once.
        self._usage: dict[str, list[int]] = {}

    def close(self) -> None:
        self.db.close()

    # -- requests ------------------------------------------------------------------------------

    def usage(self, owner: str) -> Usage:
        return Usage(*self._counts(owner))

    def _counts(self, owner: str) -> list[int]:
        if (counts := self._usage.get(owner)) is not None:
            return counts
        active, results, logs = self.db.execute(
            f"SELECT COALESCE(SUM(state NOT IN {_TERMINAL_SQL}), 0),"
            " COALESCE(SUM(CASE WHEN fetched IS NULL THEN result_bytes END), 0),"
            " COALESCE(SUM(log_bytes), 0) FROM requests WHERE owner = ?",
            (owner,),
        ).fetchone()
        counts = self._usage[owner] = [int(active), int(results), int(logs)]
        return counts

    def insert(self, request_id: str, owner: str, n_traces: int, max_result_bytes: int, max_log_bytes: int) -> None:
        """A new request and its first event, RECEIVED {id}, in one transaction."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO requests (id, owner, created, n_traces, state, n_events, max_result_bytes, max_log_bytes,"
                " since) VALUES (?, ?, ?, ?, 'RECEIVED', 1, ?, ?, ?)",
                (request_id, owner, now, n_traces, max_result_bytes, max_log_bytes, now),
            )
            self.db.execute(
                "INSERT INTO events (request_id, n, kind, data, time) VALUES (?, 0, 'RECEIVED', ?, ?)",
                (request_id, json.dumps({"id": request_id}), now),
            )
        self._counts(owner)[0] += 1

    def get(self, request_id: str) -> Row | None:
        values = self.db.execute(f"SELECT {_ROW_COLUMNS} FROM requests WHERE id = ?", (request_id,)).fetchone()
        return None if values is None else _row(values)

    def open_requests(self) -> list[Row]:
        rows = self.db.execute(f"SELECT {_ROW_COLUMNS} FROM requests WHERE state NOT IN {_TERMINAL_SQL}")
        return [_row(v) for v in rows.fetchall()]

    def set_cancel(self, request_id: str) -> None:
        self.db.execute("UPDATE requests SET cancel_requested = 1 WHERE id = ?", (request_id,))

    def set_runner(self, request_id: str, runner: str | None) -> None:
        self.db.execute("UPDATE requests SET runner = ?, since = ? WHERE id = ?", (runner, time.time(), request_id))

    def mark_fetched(self, row: Row) -> None:
        if row.fetched is not None:
            return
        self.db.execute("UPDATE requests SET fetched = ? WHERE id = ?", (time.time(), row.id))
        if row.result_bytes is not None:
            self._counts(row.owner)[1] -= row.result_bytes

    # -- events --------------------------------------------------------------------------------

    def append(self, row: Row, kind: str, data: dict[str, Any], order: tuple[str, int] | None = None,
               log_bytes: int = 0, result_bytes: int | None = None) -> None:
        """Append event number `row.n_events` and update the request's state to match it."""
        text = json.dumps(data)
        now = time.time()
        source, seq = order if order is not None else (None, None)
        sets = ["n_events = n_events + 1"]
        params: list[Any] = []
        if kind not in (LOG, RETRYING):  # news, not a state
            sets.append("state = ?")
            params.append(kind)
        if kind == QUEUED:
            sets.append("queued = ?")
            params.append(text)
        elif kind == RUNNING:
            sets.append("running = ?")
            params.append(text)
        elif kind in TERMINAL:
            sets += ["finished = ?", "result_bytes = ?"]
            params += [now, result_bytes]
            if kind == "ERROR":
                sets.append("error = ?")
                params.append(text)
        if log_bytes:
            sets.append("log_bytes = log_bytes + ?")
            params.append(log_bytes)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO events (request_id, n, kind, data, time, source, seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.id, row.n_events, kind, text, now, source, seq),
            )
            self.db.execute(f"UPDATE requests SET {', '.join(sets)} WHERE id = ?", (*params, row.id))
        counts = self._counts(row.owner)
        counts[2] += log_bytes
        if kind in TERMINAL:
            counts[0] -= 1
            counts[1] += result_bytes or 0

    def cap_logs(self, request_id: str) -> None:
        self.db.execute("UPDATE requests SET logs_capped = 1 WHERE id = ?", (request_id,))

    def events(self, request_id: str, after: int) -> list[dict]:
        rows = self.db.execute(
            "SELECT kind, data, time FROM events WHERE request_id = ? AND n >= ? ORDER BY n", (request_id, after)
        ).fetchall()
        return [{"event": k, "data": json.loads(d), "time": t} for k, d, t in rows]

    def next_seq(self, request_id: str, source: str) -> int:
        """The number the next event of `source` must have (its events so far are recorded)."""
        (last,) = self.db.execute(
            "SELECT MAX(seq) FROM events WHERE request_id = ? AND source = ?", (request_id, source)
        ).fetchone()
        return 0 if last is None else last + 1

    def hold(self, request_id: str, source: str, seq: int, kind: str, data: dict) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO held (request_id, source, seq, kind, data) VALUES (?, ?, ?, ?, ?)",
            (request_id, source, seq, kind, json.dumps(data)),
        )

    def take_held(self, request_id: str, source: str, seq: int) -> tuple[str, dict] | None:
        found = self.db.execute(
            "SELECT kind, data FROM held WHERE request_id = ? AND source = ? AND seq = ?", (request_id, source, seq)
        ).fetchone()
        if found is None:
            return None
        self.db.execute("DELETE FROM held WHERE request_id = ? AND source = ? AND seq = ?", (request_id, source, seq))
        return found[0], json.loads(found[1])

    # -- results -------------------------------------------------------------------------------

    def result_path(self, request_id: str) -> Path:
        return self.results / f"{request_id}.safetensors"

    def write_result(self, request_id: str, data: bytes) -> None:
        path = self.result_path(request_id)
        tmp = path.with_suffix(".partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def read_result(self, request_id: str) -> bytes | None:
        try:
            return self.result_path(request_id).read_bytes()
        except FileNotFoundError:
            return None

    def drop_result(self, request_id: str) -> None:
        self.db.execute("UPDATE requests SET result_bytes = NULL WHERE id = ?", (request_id,))
        self.result_path(request_id).unlink(missing_ok=True)

    # -- runners and expiry ----------------------------------------------------------------------

    def heartbeat(self, runner: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO runners (id, seen) VALUES (?, ?)", (runner, time.time()))

    def runner_seen(self) -> dict[str, float]:
        return dict(self.db.execute("SELECT id, seen FROM runners").fetchall())

    def expire(self, now: float, ttl_s: float, fetch_grace_s: float) -> int:
        """Drop requests finished more than `ttl_s` ago (events and result file too) and results
        fetched more than `fetch_grace_s` ago. Returns how many requests went."""
        gone = [r for (r,) in self.db.execute(
            "SELECT id FROM requests WHERE finished IS NOT NULL AND finished < ?", (now - ttl_s,)).fetchall()]
        fetched = [r for (r,) in self.db.execute(
            "SELECT id FROM requests WHERE fetched < ? AND result_bytes IS NOT NULL", (now - fetch_grace_s,)).fetchall()]
        for rid in fetched:
            self.drop_result(rid)
        with self.db:
            self.db.execute("BEGIN")
            for rid in gone:
                self.db.execute("DELETE FROM events WHERE request_id = ?", (rid,))
                self.db.execute("DELETE FROM held WHERE request_id = ?", (rid,))
                self.db.execute("DELETE FROM requests WHERE id = ?", (rid,))
            self.db.execute("DELETE FROM runners WHERE seen < ?", (now - max(ttl_s, 3600.0),))
        for rid in gone:
            self.result_path(rid).unlink(missing_ok=True)
        if gone or fetched:
            self._usage.clear()
        for stray in self.results.glob("*.partial"):  # a store that died mid-write
            if now - stray.stat().st_mtime > 60:
                stray.unlink(missing_ok=True)
        return len(gone)

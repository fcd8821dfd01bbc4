from __future__ import annotations

import logging
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from daemon.history import HistoryEntry, HistoryStore, SqliteDb, is_corruption, trim_history


def entry(i: int, role: str = "user", **kw: object) -> HistoryEntry:
    return HistoryEntry(role=role, text=f"text {i}", created_at=1000.0 + i, **kw)  # type: ignore[arg-type]


def test_append_and_entries_oldest_first(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.db", max_items=10)
    for i in range(3):
        store.append(entry(i))
    assert [e.text for e in store.entries()] == ["text 0", "text 1", "text 2"]
    assert len(store) == 3
    store.close()


def test_all_fields_round_trip_across_restart(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    full = HistoryEntry(
        role="tool_call", text='{"percent": 40}', created_at=1234.5, session_id="sess_1",
        turn_id="t7", call_id="call_9", name="set_volume", interrupted=True,
    )
    store = HistoryStore(path, max_items=10)
    store.append(full)
    store.append(entry(1, role="assistant"))
    store.close()

    reopened = HistoryStore(path, max_items=10)
    got = reopened.entries()
    assert got[0] == full
    assert got[1] == entry(1, role="assistant")
    assert reopened.persistent
    reopened.close()


def test_bounded_keeps_newest(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.db", max_items=5)
    for i in range(12):
        store.append(entry(i))
    assert [e.text for e in store.entries()] == [f"text {i}" for i in range(7, 12)]
    store.close()
    # The bound also holds after a restart with a smaller limit.
    smaller = HistoryStore(tmp_path / "h.db", max_items=2)
    smaller.append(entry(99))
    assert [e.text for e in smaller.entries()] == ["text 11", "text 99"]
    smaller.close()


def test_max_items_zero_keeps_nothing(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.db", max_items=0)
    store.append(entry(1))
    assert store.entries() == []
    store.close()


def test_recent_and_clear(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.db", max_items=100)
    for i in range(6):
        store.append(entry(i))
    assert [e.text for e in store.recent(2)] == ["text 4", "text 5"]
    assert store.recent(0) == []
    assert len(store.recent(50)) == 6
    store.clear()
    assert store.entries() == []
    store.append(entry(7))
    assert [e.text for e in store.entries()] == ["text 7"]
    store.close()


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    HistoryStore(path, 5).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def test_directory_0700_and_file_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "parley" / "history.db"
    store = HistoryStore(path, 5)
    store.append(entry(1))
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store.close()


def test_garbage_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(b"this is not an sqlite database at all" * 200)
    with caplog.at_level(logging.WARNING, logger="daemon.history"):
        store = HistoryStore(path, 5)
    store.append(entry(1))
    assert [e.text for e in store.entries()] == ["text 1"]
    aside = list(tmp_path.glob("h.db.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not an sqlite")
    assert any("corrupt" in r.getMessage() and "h.db" in r.getMessage() for r in caplog.records)
    assert store.persistent
    store.close()


def test_damaged_pages_are_detected_at_open(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    store = HistoryStore(path, 10_000)
    for i in range(400):
        store.append(HistoryEntry(role="user", text="x" * 200 + str(i), created_at=float(i)))
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    page = 4096
    for p in range(2, len(data) // page):  # smash every b-tree page header after the first
        data[p * page : p * page + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))

    store = HistoryStore(path, 10)
    assert store.entries() == []  # fresh database
    store.append(entry(1))
    assert len(store.entries()) == 1
    assert list(tmp_path.glob("h.db.corrupt-*"))
    store.close()


def test_corruption_during_operation_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = SqliteDb(tmp_path / "x.db", [("CREATE TABLE t (v INTEGER)",)], "test")
    calls: list[int] = []

    def op(conn: sqlite3.Connection) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.DatabaseError("database disk image is malformed")
        conn.execute("INSERT INTO t VALUES (1)")
        return "ok"

    with caplog.at_level(logging.WARNING):
        assert db.run("testing", op, "default") == "ok"
    assert len(calls) == 2
    assert list(tmp_path.glob("x.db.corrupt-*"))
    db.close()


def test_other_errors_are_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = SqliteDb(tmp_path / "x.db", [("CREATE TABLE t (v INTEGER)",)], "test")

    def op(conn: sqlite3.Connection) -> str:
        raise sqlite3.OperationalError("disk I/O error")

    with caplog.at_level(logging.ERROR):
        assert db.run("storing a thing", op, "fallback") == "fallback"
    assert "storing a thing failed" in caplog.text
    assert not list(tmp_path.glob("x.db.corrupt-*"))
    db.close()


def test_newer_schema_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 42")
    conn.commit()
    conn.close()
    store = HistoryStore(path, 5)
    store.append(entry(1))
    assert len(store.entries()) == 1
    assert list(tmp_path.glob("h.db.corrupt-*"))
    store.close()


def test_unopenable_path_falls_back_to_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("file")
    with caplog.at_level(logging.ERROR):
        store = HistoryStore(blocker / "h.db", 5)
    assert not store.persistent
    store.append(entry(1))
    assert [e.text for e in store.entries()] == ["text 1"]
    assert "in memory" in caplog.text
    store.close()


def test_unknown_roles_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    store = HistoryStore(path, 5)
    store.append(entry(1))
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO history (role, text, created_at) VALUES ('system', 'x', 1)")
    conn.commit()
    conn.close()
    store = HistoryStore(path, 5)
    assert [e.role for e in store.entries()] == ["user"]
    store.close()


def test_concurrent_appends_from_threads(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.db", 1000)

    def worker(base: int) -> None:
        for i in range(50):
            store.append(entry(base + i))

    threads = [threading.Thread(target=worker, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.entries()) == 200
    store.close()


def test_is_corruption() -> None:
    assert is_corruption(sqlite3.DatabaseError("file is not a database"))
    assert not is_corruption(sqlite3.OperationalError("database is locked"))
    assert not is_corruption(ValueError("malformed"))


def test_trim_history_unchanged_semantics() -> None:
    items = [
        HistoryEntry("user", "aa", 1.0),
        HistoryEntry("tool_call", "{}", 2.0),
        HistoryEntry("tool_output", "ok", 3.0),
        HistoryEntry("assistant", "bbbb", 4.0),
    ]
    assert trim_history(items, 10, 1000) == items
    assert trim_history(items, 2, 1000) == [items[3]]  # orphan tool_output dropped
    assert trim_history(items, 10, 6) == [items[3]]

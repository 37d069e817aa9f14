"""The SQLite transcript store: durable rows, recent listing, retention, and `open --store`
working with either store."""

from __future__ import annotations

import json
import time

import pytest
from commitllm.engine.commit import TranscriptStore
from commitllm.engine.serve.store import DB_NAME, SqliteStore, open_store


def _receipt(i: int) -> dict:
    return {"receipt_id": f"{i:064x}", "text": f"r{i}"}


def test_put_get_survives_reopen(tmp_path):
    st = SqliteStore(tmp_path / "st")
    for i in range(3):
        st.put(_receipt(i), seed=i, salt=bytes([i]) * 16, extra={"model": "m"})
    st.close()  # a clean close; the crash case is tests/test_serve_crash.py
    st = open_store(tmp_path / "st")
    assert isinstance(st, SqliteStore) and st.count() == 3
    got = st.get(f"{1:064x}")
    assert got == {"receipt": _receipt(1), "seed": 1, "salt": "01" * 16, "model": "m"}
    assert [r["text"] for r in st.recent(2)] == ["r2", "r1"]
    assert (tmp_path / "st" / DB_NAME).stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeyError, match="malformed"):
        st.get("../etc/passwd")
    with pytest.raises(KeyError, match="no transcript"):
        st.get("f" * 64)


def test_wal_mode_and_full_sync(tmp_path):
    st = SqliteStore(tmp_path)
    assert st._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_retention_drops_old_rows(tmp_path):
    st = SqliteStore(tmp_path, retention_s=100.0)
    st.put(_receipt(1), 0, b"\0" * 16)
    assert st.purge(now=time.time() + 50) == 0
    assert st.purge(now=time.time() + 200) == 1 and st.count() == 0
    assert SqliteStore(tmp_path / "b", retention_s=0).purge(now=1e12) == 0  # 0 keeps forever


def test_open_store_keeps_the_json_directory_store(tmp_path):
    ts = TranscriptStore(tmp_path / "json")
    ts.put(_receipt(5), 0, b"\1" * 16)
    st = open_store(tmp_path / "json")
    assert isinstance(st, TranscriptStore) and st.get(f"{5:064x}")["receipt"] == _receipt(5)
    assert json.loads((tmp_path / "json" / f"{5:064x}.json").read_text())["salt"] == "01" * 16

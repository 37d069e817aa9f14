"""The durable transcript store of the server: SQLite in WAL mode, one row per receipt.

A row holds what `commitllm-engine open` needs to re-execute a receipt (the receipt, the seed, the
salt, the model and profile); nothing per token. `open_store` picks it or the JSON-directory store
(engine.commit.TranscriptStore) for a path, so `open --store` works with either.

Durability: the row is committed with synchronous=FULL before the response leaves the server, so
a receipt a client holds survives a SIGKILL of the server (and a power loss, as far as the disk
honours fsync). A row is never updated in place."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from ..commit import _ID, TranscriptStore

DB_NAME = "transcripts.sqlite"


class SqliteStore:
    """DIR/transcripts.sqlite. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, retention_s: float = 0.0):
        path = Path(path)
        if path.suffix not in (".sqlite", ".db"):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.chmod(0o700)  # the store's own folder: every client's prompts and answers
            path = path / DB_NAME
        else:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private_files(path)
        self.path, self.retention_s = path, retention_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS transcripts (receipt_id TEXT PRIMARY KEY, "
                         "created REAL NOT NULL, data TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS by_created ON transcripts (created)")

    def put(self, receipt: dict, seed: int, salt: bytes, extra: dict | None = None) -> None:
        data = json.dumps({"receipt": receipt, "seed": seed, "salt": salt.hex(), **(extra or {})})
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO transcripts VALUES (?, ?, ?)",
                             (receipt["receipt_id"], time.time(), data))

    def get(self, receipt_id: str) -> dict:
        if not _ID.match(receipt_id):
            raise KeyError(f"malformed receipt id {receipt_id!r}")
        with self._lock:
            row = self._db.execute("SELECT data FROM transcripts WHERE receipt_id = ?",
                                   (receipt_id,)).fetchone()
        if row is None:
            raise KeyError(f"no transcript for receipt {receipt_id} in {self.path}")
        return json.loads(row[0])

    def recent(self, limit: int) -> list[dict]:
        """The receipts of the `limit` most recent transcripts, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT data FROM transcripts ORDER BY created DESC LIMIT ?",
                                    (int(limit),)).fetchall()
        return [json.loads(r[0])["receipt"] for r in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM transcripts").fetchone()[0]

    def purge(self, now: float | None = None) -> int:
        """Drop transcripts older than the retention (0 keeps them forever); returns how many."""
        if self.retention_s <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_s
        with self._lock:
            return self._db.execute("DELETE FROM transcripts WHERE created < ?", (cutoff,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _private_files(db: Path) -> None:
    """The database, its -wal and its -shm exist with mode 0600 before SQLite opens them (SQLite
    keeps an existing file's mode, and gives the files it creates later the database's)."""
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def open_store(path: Path, retention_s: float = 0.0):
    """The SQLite store when PATH is a .sqlite/.db file or a folder holding one, else the
    JSON-directory store."""
    path = Path(path)
    if path.suffix in (".sqlite", ".db") or (path / DB_NAME).is_file():
        return SqliteStore(path, retention_s)
    return TranscriptStore(path)

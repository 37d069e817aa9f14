"""The server's audit endpoint: a challenge's shape is checked against the stored receipt before
anything is re-executed (400), an answer over the server's limit is refused before it is
computed (413), openings run one at a time from a bounded queue (429 with Retry-After when it is
full) under a first-come lock so generation waits for at most one opening, and the SQLite store
is private from its first write."""

from __future__ import annotations

import json
import stat
import threading
import time
import urllib.error
import urllib.request

import pytest
from commitllm.verifier import challenge as ch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from test_serve import ThreadServer
from tinymodels import make_tiny_chat_model

SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("srvaudit")
    s = ThreadServer(make_tiny_chat_model(d / "tiny"), d / "store", max_audit_queue=1,
                     max_opening_bytes=8 << 20)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def receipt(srv):
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    return c.completions.create(model="tiny", prompt="abcdef", max_tokens=4,
                                temperature=0).receipt


def _post(srv, body) -> tuple[int, dict, dict]:
    req = urllib.request.Request(srv.url + "/v1/audit", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, {}
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def _counting(srv, monkeypatch):
    calls = []
    real = srv.worker.open
    monkeypatch.setattr(srv.worker, "open", lambda *a: calls.append(1) or real(*a))
    return calls


def _edits(r):
    n, L = r["trace"]["positions"], r["trace"]["layers"]
    fd = len(r["prompt_token_ids"]) - 1
    return {
        "position-past-the-receipt": {"positions": [0, n]},
        "negative-position": {"positions": [-1, 0]},
        "unsorted-positions": {"positions": [2, 1]},
        "duplicate-positions": {"positions": [1, 1]},
        "bool-position": {"positions": [True]},
        "empty-positions": {"positions": []},
        "huge-positions": {"positions": list(range(10 * n))},
        "layer-past-the-model": {"layers": [L]},
        "kv-sample-past-the-horizon": {"kv_sample": {"0": [n + 5]}},
        "kv-sample-unknown-layer": {"kv_sample": {str(L + 3): [0]}},
        "decode-not-among-positions": {"decode_positions": [n - 1], "positions": [fd]},
        "decode-in-the-prompt": {"decode_positions": [0], "positions": [0]},
        "extra-key": {"extra": 1},
        "other-version": {"version": "commitllm-challenge/0"},
        "mac-not-hex": {"mac": "zz"},
    }


@pytest.mark.parametrize("name", sorted(_edits({"trace": {"positions": 8, "layers": 2},
                                                 "prompt_token_ids": [1, 2, 3]})))
def test_out_of_range_challenge_refused_before_reexecution(srv, receipt, monkeypatch, name):
    calls = _counting(srv, monkeypatch)
    c = ch.derive(SECRET, receipt, "full") | _edits(receipt)[name]
    status, _, err = _post(srv, c)
    assert status == 400 and calls == [], (status, err)


def test_honest_challenges_answered(srv, receipt, monkeypatch):
    calls = _counting(srv, monkeypatch)
    for tier in ("routine", "full", "deep"):
        assert _post(srv, ch.derive(SECRET, receipt, tier))[0] == 200, tier
    assert len(calls) == 3


def test_answer_over_the_limit_refused_before_reexecution(tmp_path, monkeypatch):
    s = ThreadServer(make_tiny_chat_model(tmp_path / "tiny"), tmp_path / "store",
                     max_opening_bytes=100_000)
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model="tiny", prompt="abcdefgh", max_tokens=8,
                                 temperature=0).receipt
        calls = _counting(s, monkeypatch)
        status, _, err = _post(s, ch.derive(SECRET, r, "deep"))
        assert status == 413 and calls == [] and "bytes" in err["error"]["message"]
    finally:
        s.stop()


def test_full_audit_queue_gets_429_with_retry_after(srv, receipt, monkeypatch):
    release, started = threading.Event(), threading.Event()
    real = srv.worker.open

    def slow(*a):
        started.set()
        release.wait(30)
        return real(*a)
    monkeypatch.setattr(srv.worker, "open", slow)
    first = {}
    t = threading.Thread(target=lambda: first.update(r=_post(srv, ch.derive(SECRET, receipt,
                                                                            "routine"))))
    t.start()
    assert started.wait(30)
    try:
        status, headers, err = _post(srv, ch.derive(SECRET, receipt, "routine"))
        assert status == 429 and int(headers.get("Retry-After")) > 0, (status, err)
    finally:
        release.set()
        t.join(60)
    assert first["r"][0] == 200


def test_fair_lock_serves_in_arrival_order():
    """A batch that asks for the model while an opening holds it runs before the next opening,
    however often openings come: generation waits for at most the one opening ahead of it."""
    from commitllm.engine.serve.worker import FairLock

    lock, order = FairLock(), []
    lock.acquire()

    def user(name):
        with lock:
            order.append(name)
    threads = [threading.Thread(target=user, args=(n,))
               for n in ("batch", "opening-2", "opening-3")]
    for i, t in enumerate(threads):
        t.start()
        deadline = time.monotonic() + 30
        while lock._next < i + 2:  # this one took its ticket (no fixed sleep: a loaded CI
            assert time.monotonic() < deadline  # machine may start a thread late)
            time.sleep(0.005)
    assert not lock.acquire(blocking=False)  # others are waiting: no cutting in
    lock.release()
    for t in threads:
        t.join(10)
    assert order == ["batch", "opening-2", "opening-3"]
    assert lock.acquire(blocking=False)
    lock.release()


@pytest.mark.parametrize("as_file", [False, True])
def test_store_is_private_from_the_first_write(tmp_path, as_file):
    from commitllm.engine.serve.store import SqliteStore

    where = tmp_path / ("t.sqlite" if as_file else "store")
    s = SqliteStore(where)
    try:
        s.put({"receipt_id": "a" * 64}, 1, b"salt")
        db = s.path
        files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        for f in files:
            assert f.exists() and stat.S_IMODE(f.stat().st_mode) == 0o600, f
        if not as_file:
            assert stat.S_IMODE(where.stat().st_mode) == 0o700
    finally:
        s.close()

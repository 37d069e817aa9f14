"""HTTP for the auditor (standard library only): one exchange = one request and its whole reply,
under one wall-clock deadline and one size limit.

The deadline is the exchange's, not a socket read's: a server that drips a byte every second
keeps every read short, so a watchdog shuts the socket down when the deadline passes and the
exchange fails, however the server paces its bytes. The reply is refused before it is read when
its declared length is over the limit, and never read past limit + 1 bytes. Error bodies are
read up to MAX_ERROR_BYTES and parsed with safejson (depth and number sizes bounded)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.parse

from . import safejson

MAX_ERROR_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 300  # of a server's error message shown to the user


class Unreachable(Exception):
    """No complete reply (connection refused or reset, deadline passed, protocol error)."""


class DeadlineExceeded(Unreachable):
    pass


class Refused(Exception):
    """The server answered with an error status (or a reply over the size limit: status 0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


def exchange(url: str, body: bytes | None, *, limit: int, deadline_s: float,
             bearer: str | None = None) -> bytes:
    """GET (body None) or POST JSON; the reply's body (status 2xx). Raises Refused, Unreachable
    or DeadlineExceeded; never waits past deadline_s (plus the shutdown's few milliseconds)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise Unreachable(f"{url}: not an http(s) URL")
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    conn = cls(u.hostname, u.port, timeout=deadline_s)
    expired, held = threading.Event(), []  # held: the socket, kept past conn.close()
    watchdog = threading.Timer(deadline_s, _expire, (held, expired))
    watchdog.daemon = True
    start = time.monotonic()
    watchdog.start()
    try:
        conn.connect()  # bounded by the socket timeout (= the deadline)
        held.append(conn.sock)
        if expired.is_set():
            raise OSError("deadline passed while connecting")
        conn.request("GET" if body is None else "POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        ok = 200 <= resp.status < 300
        data = _read(resp, limit if ok else MAX_ERROR_BYTES, url, strict=ok)
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set() or time.monotonic() - start >= deadline_s:
            raise DeadlineExceeded(f"{url}: no complete reply within {deadline_s:g} s") from None
        raise Unreachable(f"{url}: unreachable ({e})") from None
    finally:
        watchdog.cancel()
        conn.close()
    if expired.is_set():  # the shutdown may end a read as if the reply were complete
        raise DeadlineExceeded(f"{url}: no complete reply within {deadline_s:g} s")
    if not ok:
        raise Refused(resp.status, error_message(data, resp.reason))
    return data


def _expire(held: list, expired: threading.Event) -> None:
    """At the deadline: shut the socket down (an HTTP/1.0 reply is read after the connection
    object let go of it, so the socket itself is held, not conn.sock)."""
    expired.set()
    for sock in held:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # unblocks a read in progress in the other thread
        except OSError:
            pass


def _read(resp, limit: int, url: str, strict: bool) -> bytes:
    n = resp.getheader("Content-Length")
    if strict and n is not None and (not n.strip().isdigit() or int(n) > limit):
        raise Refused(0, f"{url}: reply of {n} bytes exceeds the {limit}-byte limit")
    data = resp.read(limit + 1)
    if len(data) > limit:
        if strict:
            raise Refused(0, f"{url}: reply exceeds the {limit}-byte limit")
        data = data[:limit]
    return data


def error_message(data: bytes, reason: str) -> str:
    """An OpenAI error body's message (bounded parse, shortened), else the status reason."""
    try:
        msg = safejson.loads(data, max_bytes=MAX_ERROR_BYTES, max_depth=8)["error"]["message"]
    except (safejson.JSONError, KeyError, TypeError, IndexError):
        return str(reason)[:MAX_MESSAGE_CHARS]
    if not isinstance(msg, str):
        return str(reason)[:MAX_MESSAGE_CHARS]
    return msg[:MAX_MESSAGE_CHARS]

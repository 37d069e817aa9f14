"""`commitllm audit` against a hostile server (a scripted HTTP server, no model) and hostile
saved receipts: a wall-clock deadline per exchange (a slow drip does not extend it), capped
receipt lists and replies, bounded parsing of every answer (error bodies included), and one
verdict row per receipt: whatever one receipt's opening or file does, the audit goes on."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from commitllm.keys.keygen import save_key
from commitllm.verifier import audit as au
from commitllm.verifier import httpclient
from commitllm.verifier.cli import app as verifier_app
from typer.testing import CliRunner

cli = CliRunner()


class Script:
    """What the fake server answers: status, headers, body, and how it paces the body."""

    def __init__(self, status=200, body=b"", drip_s=0.0, headers=None, header_drip_s=0.0):
        self.status, self.body, self.drip_s = status, body, drip_s
        self.headers, self.header_drip_s = headers or {}, header_drip_s
        self.calls = 0


class FakeServer:
    def __init__(self, routes: dict[str, Script]):
        routes_ = routes

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                s = routes_[self.path.split("?")[0]]
                s.calls += 1
                try:
                    if s.header_drip_s:  # the status line and headers, a byte at a time
                        for b in f"HTTP/1.1 {s.status} OK\r\nX-Pad: {'a' * 1000}".encode():
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(s.header_drip_s)
                        return
                    self.send_response(s.status)
                    for k, v in s.headers.items():
                        self.send_header(k, v)
                    if "Content-Length" not in s.headers:
                        self.send_header("Content-Length", str(len(s.body)))
                    self.end_headers()
                    if not s.drip_s:
                        self.wfile.write(s.body)
                        return
                    for i in range(len(s.body)):
                        self.wfile.write(s.body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(s.drip_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(routes):
        servers.append(FakeServer(routes))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def keyfile(world, tmp_path_factory):
    p = tmp_path_factory.mktemp("auditor") / "key"
    save_key(world.key, p)
    return p


def _receipts(world, tmp_path, n: int = 2):
    for i in range(n):
        (tmp_path / f"r{i}.json").write_text(json.dumps(world.served.receipt))
    return tmp_path


def _run(*args):
    t0 = time.monotonic()
    res = cli.invoke(verifier_app, ["audit", *map(str, args), "--json"])
    return res, time.monotonic() - t0


def _rows(res) -> list[dict]:
    return json.loads(res.stdout)["rows"] if res.stdout.strip() else []  # one document


# --- deadline -----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["body", "headers"])
def test_slow_drip_hits_the_deadline(fake, world, keyfile, tmp_path, where):
    """A byte every 0.05 s keeps every socket read short; the exchange's deadline still ends it:
    2 receipts x 1 s deadline, not the minutes the whole drip would take."""
    script = (Script(body=b"x" * 10_000, drip_s=0.05) if where == "body"
              else Script(header_drip_s=0.05))
    srv = fake({"/v1/audit": script})
    res, dt = _run("--server", srv.url, "--key", keyfile, "--receipts",
                   _receipts(world, tmp_path), "--timeout", "1")
    rows = _rows(res)
    assert res.exit_code == 1 and len(rows) == 2, res.output
    assert all(r["reason"] == "opening_unavailable" and "within 1 s" in r["detail"] for r in rows)
    assert dt < 2 * 1 + 3, dt  # two deadlines plus start-up, never the drip's 500 s


def test_deadline_covers_connect_to_reply(fake):
    srv = fake({"/x": Script(body=b"y" * 100, drip_s=0.02)})
    t0 = time.monotonic()
    with pytest.raises(httpclient.DeadlineExceeded):
        httpclient.exchange(srv.url + "/x", None, limit=1000, deadline_s=0.5)
    assert time.monotonic() - t0 < 1.5


# --- caps ---------------------------------------------------------------------------------------

def test_server_receipt_list_longer_than_asked(fake, world, keyfile):
    listed = json.dumps({"data": [world.served.receipt] * 5}).encode()
    srv = fake({"/v1/receipts": Script(body=listed)})
    res, _ = _run("--server", srv.url, "--key", keyfile, "--limit", "3")
    assert res.exit_code == 2 and "at most 3" in res.output


def test_server_receipt_list_over_the_byte_cap(fake, keyfile, monkeypatch):
    monkeypatch.setattr(au, "MAX_LIST_BYTES", 1000)
    srv = fake({"/v1/receipts": Script(body=b"[" * 2000)})
    res, _ = _run("--server", srv.url, "--key", keyfile)
    assert res.exit_code == 2 and "limit" in res.output
    # a declared length over the cap is refused before a byte of the body is read
    srv = fake({"/v1/receipts": Script(body=b"{}", headers={"Content-Length": "99999999999"})})
    res, _ = _run("--server", srv.url, "--key", keyfile)
    assert res.exit_code == 2 and "exceeds" in res.output


def test_saved_receipt_list_is_capped(world, keyfile, tmp_path):
    (tmp_path / "many.json").write_text(json.dumps([{"receipt_id": "0" * 64}] * 50))
    res, _ = _run("--server", "http://127.0.0.1:1", "--key", keyfile, "--receipts",
                  tmp_path / "many.json", "--max-receipts", "10")
    assert res.exit_code == 2 and "more than the 10 receipts" in res.output
    for i in range(12):
        (tmp_path / f"f{i}.json").write_text("{}")
    res, _ = _run("--server", "http://127.0.0.1:1", "--key", keyfile, "--receipts", tmp_path,
                  "--max-receipts", "10")
    assert res.exit_code == 2 and "files" in res.output


def test_opening_over_the_size_limit_refused_before_reading(fake, world, keyfile, tmp_path):
    srv = fake({"/v1/audit": Script(body=b"", headers={"Content-Length": str(2 << 20)})})
    res, _ = _run("--server", srv.url, "--key", keyfile, "--receipts",
                  _receipts(world, tmp_path, 1), "--max-opening-mib", "1")
    assert res.exit_code == 1 and "exceeds" in _rows(res)[0]["detail"]


# --- one row per receipt ------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"garbage", b"CLLMOPN\x00" + b"\xff" * 64, b""])
def test_malformed_opening_is_a_row_and_the_audit_goes_on(fake, world, keyfile, tmp_path, body):
    srv = fake({"/v1/audit": Script(body=body)})
    folder = _receipts(world, tmp_path, 2)
    (folder / "broken.json").write_text("{not json")
    (folder / "deep.json").write_text("[" * 100_000)
    (folder / "foreign.json").write_text(json.dumps({"hello": "world"}))
    (folder / "badreceipt.json").write_text(json.dumps({"receipt_id": "0" * 64}))
    res, _ = _run("--server", srv.url, "--key", keyfile, "--receipts", folder)
    rows = _rows(res)
    assert res.exit_code == 1 and len(rows) == 6, res.output
    reasons = sorted(r["reason"] for r in rows)
    assert reasons == sorted(["opening_malformed"] * 2 + ["receipt_unreadable"] * 2
                             + ["exchange_malformed", "receipt_malformed"]), reasons
    assert "6 of 6 receipts audited: 0 accepted, 6 rejected" in res.output


@pytest.mark.parametrize("body", [
    b"[" * 100_000,  # nested past any parser's recursion limit
    b'{"error": {"message": 1' + b"0" * 100_000 + b"}}",  # a 100 000-digit number
    b'{"error": {"message": 1e999}}', b'{"error": {"message": NaN}}',
    b'{"error": {"message": "' + b"m" * 1_000_000 + b'"}}',  # over the error-body cap
    b"\xff\xfe not utf-8"])
def test_hostile_error_bodies(fake, world, keyfile, tmp_path, body):
    srv = fake({"/v1/audit": Script(status=500, body=body)})
    res, _ = _run("--server", srv.url, "--key", keyfile, "--receipts",
                  _receipts(world, tmp_path, 1))
    rows = _rows(res)
    assert res.exit_code == 1 and len(rows) == 1, res.output
    assert rows[0]["reason"] == "opening_unavailable" and "HTTP 500" in rows[0]["detail"]
    assert len(rows[0]["detail"]) < 400


def test_hostile_receipt_list(fake, keyfile):
    for body in (b"[" * 100_000, b'{"data": [1' + b"0" * 10_000 + b"]}",
                 b'{"data": 1, "data": []}'):
        srv = fake({"/v1/receipts": Script(body=body)})
        res, _ = _run("--server", srv.url, "--key", keyfile)
        assert res.exit_code == 2 and "not a receipt list" in res.output, res.output


def test_server_list_cannot_supply_a_request(fake, world, keyfile):
    """The server's receipt list is the server's: an entry dressed as a client's record (with
    a request of the server's choosing) is no receipt, and no request is ever checked from it."""
    forged = {"endpoint": "/v1/completions", "request": world.client_request(),
              "receipt": world.served.receipt}
    listed = json.dumps({"data": [forged, world.served.receipt, 7]}).encode()
    srv = fake({"/v1/receipts": Script(body=listed), "/v1/audit": Script(status=404, body=b"{}")})
    res, _ = _run("--server", srv.url, "--key", keyfile, "--limit", "3")
    rows = _rows(res)
    assert len(rows) == 3 and not any(r["request_checked"] for r in rows), rows
    assert sorted(r["reason"] for r in rows) == ["opening_unavailable", "receipt_malformed",
                                                 "receipt_malformed"]


def test_refused_credential_stops_the_audit(fake, world, keyfile, tmp_path):
    for status in (401, 403):
        srv = fake({"/v1/audit": Script(status=status, body=b'{"error": {"message": "no"}}')})
        res, _ = _run("--server", srv.url, "--key", keyfile, "--receipts",
                      _receipts(world, tmp_path, 1))
        assert res.exit_code == 2 and "audit key" in res.output


def test_receipt_beyond_the_keys_model_is_refused_before_any_request(fake, world, keyfile,
                                                                     tmp_path):
    """A saved receipt (properly sealed) whose token ids or length do not fit the key's model is
    rejected from the key's bounds (token_range / context_length): the server is never asked."""
    from commitllm.verifier.receipt import build_receipt

    cfg, r = world.key.meta["config"], world.served.receipt

    def sealed(prompt, out):
        return build_receipt(r["manifest"], r["request"], r["nonce"], prompt, out, r["text"],
                             r["trace"])
    (tmp_path / "vocab.json").write_text(json.dumps(
        sealed(r["prompt_token_ids"], [cfg["vocab_size"]] * len(r["output_token_ids"]))))
    long = [1] * (cfg["max_position_embeddings"] + 1)
    (tmp_path / "ctx.json").write_text(json.dumps(sealed(long, r["output_token_ids"])))
    script = Script(body=b"never read")
    srv = fake({"/v1/audit": script})
    res, _ = _run("--server", srv.url, "--key", keyfile, "--receipts", tmp_path)
    reasons = sorted(row["reason"] for row in _rows(res))
    assert res.exit_code == 1 and reasons == ["context_length", "token_range"], res.output
    assert script.calls == 0

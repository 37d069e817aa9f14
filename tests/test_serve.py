"""The OpenAI-compatible server: the official openai client (chat, completion, streaming), then
`commitllm audit` over the receipts it got; batch invariance of receipts; refused requests; the
SQLite store. A tiny random model with a character tokenizer keeps it fast."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from commitllm.verifier.cli import app as verifier_app
from tinymodels import make_tiny_chat_model
from typer.testing import CliRunner

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench` (last: kernels/ must not shadow)
from bench.serve_load import free_port

cli = CliRunner()


class ThreadServer:
    """build() + uvicorn in a thread on a free port."""

    def __init__(self, model, store, **kw):
        import uvicorn
        from commitllm.engine.serve.main import build
        from rich.console import Console

        self.app, self.worker, self.store = build(str(model), "w8a16", store,
                                                  Console(quiet=True), **kw)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.worker.stop()
        self.store.close()


@pytest.fixture(scope="module")
def model_and_key(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    folder = make_tiny_chat_model(d / "tiny")
    res = cli.invoke(verifier_app, ["keygen", "--model", str(folder), "--out", str(d / "key")])
    assert res.exit_code == 0, res.output
    return folder, d / "key"


@pytest.fixture(scope="module")
def server(model_and_key, tmp_path_factory):
    srv = ThreadServer(model_and_key[0], tmp_path_factory.mktemp("store"), max_body_bytes=4096)
    yield srv
    srv.stop()


def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


def _audit(srv, key, *extra):
    return cli.invoke(verifier_app, ["audit", "--server", srv.url, "--key", str(key), *extra])


def test_openai_client_then_audit(server, model_and_key, tmp_path):
    c, key = client(server), model_and_key[1]
    model = c.models.list().data[0].id
    saved = []
    chat_req = {"model": model, "messages": [{"role": "user", "content": "Hello there"}],
                "max_tokens": 6, "temperature": 0, "nonce": "client-nonce-1"}
    r = c.chat.completions.create(**{k: v for k, v in chat_req.items() if k != "nonce"},
                                  extra_body={"nonce": "client-nonce-1"})
    assert r.choices[0].message.content == r.receipt["text"]
    assert r.receipt["nonce"] == "client-nonce-1" and r.usage.completion_tokens == len(
        r.receipt["output_token_ids"]) <= 6
    saved.append({"request": chat_req, "response": r.model_dump()})
    comp_req = {"model": model, "prompt": "abc", "max_tokens": 5, "temperature": 0.9, "seed": 7}
    r = c.completions.create(**comp_req)
    assert r.choices[0].text == r.receipt["text"] and r.receipt["manifest"]["seed_commitment"]
    saved.append({"request": comp_req, "response": r.model_dump()})
    stream_req = {"model": model, "messages": [{"role": "user", "content": "Stream, please"}],
                  "max_tokens": 7, "temperature": 0}
    chunks = list(c.chat.completions.create(**stream_req, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    receipt = chunks[-1].receipt
    assert text == receipt["text"] and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len({ch.id for ch in chunks}) == 1
    saved.append({"request": stream_req, "receipt": receipt})
    for i, s in enumerate(saved):
        (tmp_path / f"{i}.json").write_text(json.dumps(s))
    res = _audit(server, key, "--receipts", str(tmp_path), "--tier", "full")
    assert res.exit_code == 0, res.output
    assert "3 of 3 receipts audited: 3 accepted, 0 rejected" in res.output


def test_audit_rejects_a_request_the_client_did_not_send(server, model_and_key, tmp_path):
    c = client(server)
    req = {"model": c.models.list().data[0].id, "prompt": "xyz", "max_tokens": 3, "temperature": 0}
    r = c.completions.create(**req)
    (tmp_path / "r.json").write_text(json.dumps({"request": req | {"max_tokens": 4},
                                                 "response": r.model_dump()}))
    res = _audit(server, model_and_key[1], "--receipts", str(tmp_path / "r.json"), "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)  # one document
    assert doc["rejected"] == 1 and doc["rows"][0]["reason"] == "request_mismatch"


def test_audit_server_sample(server, model_and_key):
    c = client(server)
    c.completions.create(model=c.models.list().data[0].id, prompt="q", max_tokens=2)
    res = _audit(server, model_and_key[1], "--rate", "0.5")
    assert res.exit_code == 0, res.output
    assert "rejected" in res.output and ", 0 rejected" in res.output


def test_receipts_are_batch_invariant(server):
    c = client(server)
    model = c.models.list().data[0].id
    req = {"model": model, "prompt": "the same request", "max_tokens": 6, "temperature": 0,
           "extra_body": {"nonce": "same"}}
    alone = c.completions.create(**req).receipt
    before = server.worker.stats.largest_batch
    others = [{"model": model, "prompt": "x" * (3 + 5 * i), "max_tokens": 3 + i,
               "temperature": 0.7, "seed": i} for i in range(5)]
    with ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(c.completions.create, **o) for o in others[:3]]
        mine = ex.submit(c.completions.create, **req)
        futs += [ex.submit(c.completions.create, **o) for o in others[3:]]
        batched = mine.result().receipt
        [f.result() for f in futs]
    assert server.worker.stats.largest_batch > max(before, 1)  # it did share a batch
    with urllib.request.urlopen(f"{server.url}/v1/stats") as resp:
        assert json.loads(resp.read())["largest_batch"] == server.worker.stats.largest_batch
    assert batched == alone  # greedy: no salt in the receipt, so every byte is committed


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_worker_batch_receipts_equal_alone(server, tmp_path, batching):
    """Sampled requests with injected salts: the receipts made in one batch of six (different
    prompt lengths, settings and max_tokens) equal, byte for byte, those made one at a time; with
    continuous batching the prompts are also split over steps by a small token budget."""
    from commitllm.engine.receipts import SeqRequest
    from commitllm.engine.serve.store import SqliteStore
    from commitllm.engine.serve.worker import Job, Worker
    from commitllm.verifier.numerics.sampler import SamplingParams

    w0, tok = server.worker, server.worker.tokenizer
    seqs = [SeqRequest({"prompt": "p" * (2 + 7 * i)}, tok.encode("p" * (2 + 7 * i)),
                       SamplingParams(0.5 + 0.2 * i, i % 3 * 5, 1.0 - 0.1 * (i % 2), 100 + i),
                       3 + 2 * i, f"n{i}", bytes([i]) * 16) for i in range(6)]

    def receipts(groups):
        w = Worker(w0.model, tok, w0.eos_ids, SqliteStore(tmp_path / f"s{len(groups)}"), {},
                   start=False, batching=batching, token_budget=9, max_batch=6)
        with w0.lock:  # the server's worker stays off the model meanwhile
            futs = [w.submit(Job(s)) for s in groups[0]]
            w.start()
            out = [f.result()[0] for f in futs]
            for g in groups[1:]:
                out += [w.submit(Job(s)).result()[0] for s in g]
        w.stop()
        return out, w.stats

    batched, st = receipts([seqs])
    if batching == "static":
        assert (st.batches, st.largest_batch) == (1, 6)
    else:  # 2 + 9 + ... + 37 prompt tokens, at most 9 tokens a step: prompts split over steps
        assert 1 < st.largest_batch <= 6 and st.batches > 14 and st.requests == 6
    alone, st = receipts([[]] + [[s] for s in seqs])
    assert st.largest_batch == 1
    assert batched == alone


def _post(srv, path, data: bytes):
    req = urllib.request.Request(f"{srv.url}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "unknown model"),
    ({"prompt": "a", "logit_bias": {"5": 2}}, 400, "logit_bias"),
    ({"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "a", "n": 2}, 400, "n > 1"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "a", "stop": [""]}, 400, "stop"),
    ({"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "a", "logprobs": 1, "stream": True}, 400, "without streaming"),
    ({"prompt": [5, -1]}, 400, "prompt"),
    ({"prompt": "a", "frobnicate": 1}, 400, "unsupported parameter 'frobnicate'"),
    ({"prompt": "a" * 300}, 400, "context"),
    ({"prompt": "a" * 200, "max_tokens": 100}, 400, "exceed the context"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a" * 5000}, 413, "larger than 4096"),
])
def test_bad_requests_are_refused(server, body, status, words):
    if isinstance(body, dict):
        body = json.dumps({"model": "tiny"} | body).encode()
    got, msg = _post(server, "/v1/completions", body)
    assert (got, words in msg) == (status, True), msg


def test_bad_chat_requests_are_refused(server):
    for messages, words in (([], "non-empty"), ([{"role": "user", "content": "a", "name": "x"}],
                                                "role, content")):
        body = {"model": "tiny", "messages": messages}
        assert _post(server, "/v1/chat/completions", json.dumps(body).encode())[0] == 400
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
            "tools": [{"type": "function"}]}
    got, msg = _post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert got == 400 and "tools" in msg


def test_audit_endpoint_refuses_unknown_receipts(server):
    got, msg = _post(server, "/v1/audit", json.dumps({"receipt_id": "ab" * 32, "mac": "0"}).encode())
    assert got == 404 and "no transcript" in msg
    assert _post(server, "/v1/audit", b"{}")[0] == 400


def test_commitment_and_models(server, model_and_key):
    from commitllm.keys.keygen import load_key

    key = load_key(model_and_key[1])
    with urllib.request.urlopen(f"{server.url}/v1/commitment") as resp:
        com = json.loads(resp.read())
    assert com["model_commitment"] == key.meta["model_commitment"]
    for k in ("spec_version", "numerics_digest", "rope_digest", "tokenizer_hash"):
        assert com["manifest"][k] == key.meta[k]


def test_concurrency_gate():
    from commitllm.engine.serve.app import _Gate
    from commitllm.engine.serve.protocol import ApiError

    g = _Gate(1)
    with g:
        with pytest.raises(ApiError) as e, g:
            pass
        assert e.value.status == 429
    with g:
        pass


def test_engine_open_reads_the_sqlite_store(server, model_and_key, tmp_path):
    """`commitllm-engine open --store` answers a challenge from the server's store."""
    from commitllm.engine.cli import app as engine_app

    c = client(server)
    r = c.completions.create(model=c.models.list().data[0].id, prompt="open me", max_tokens=3)
    (tmp_path / "r.json").write_text(json.dumps(r.receipt))
    key = str(model_and_key[1])
    res = cli.invoke(verifier_app, ["challenge", "--key", key, "--receipt", str(tmp_path / "r.json"),
                                    "--tier", "full", "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    res = cli.invoke(engine_app, ["open", "--store", str(server.store.path.parent), "--challenge",
                                  str(tmp_path / "c.json"), "--out", str(tmp_path / "o.bin")])
    assert res.exit_code == 0, res.output
    res = cli.invoke(verifier_app, ["verify", "--key", key, "--receipt", str(tmp_path / "r.json"),
                                    "--challenge", str(tmp_path / "c.json"), "--opening",
                                    str(tmp_path / "o.bin")])
    assert res.exit_code == 0 and "ACCEPTED" in res.output, res.output


@pytest.mark.slow  # the load bench end to end (its figures: bench/results/serve_load.md)
def test_serve_load_bench_smoke(tmp_path):
    """bench/serve_load.py end to end on the tiny model: nothing lost, every receipt verifies."""
    from bench import serve_load

    assert serve_load.main(["--clients", "1,3", "--min-requests", "4", "--max-tokens", "4",
                            "--batching", "continuous,static", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "serve_load.json").read_text())["models"]["tiny"]
    got = [(r["batching"], r["clients"], r["completed"], r["lost"], r["accepted"])
           for r in m["runs"]]
    assert got == [("continuous", 1, 4, 0, 4), ("continuous", 3, 6, 0, 6),
                   ("static", 1, 4, 0, 4), ("static", 3, 6, 0, 6)]
    assert all(r["ttft_s"]["p50"] <= r["latency_s"]["p50"] for r in m["runs"])
    tokens = {(r["batching"], r["clients"]): r["tokens"] for r in m["runs"]}
    assert all(tokens["continuous", n] == tokens["static", n] for n in (1, 3))  # same answers
    assert set(m["ratios"]) == {"1", "3"}
    md = (tmp_path / "serve_load.md").read_text()
    assert "| continuous | 3 | 6/6 |" in md and "| static | 1 | 4/4 |" in md
    assert serve_load.main(["--clients", "2", "--min-requests", "4", "--max-tokens", "4",
                            "--batching", "continuous", "--workload", "unique",
                            "--out", str(tmp_path)]) == 0
    models = json.loads((tmp_path / "serve_load.json").read_text())["models"]
    assert set(models) == {"tiny", "tiny, unique prompts"}  # the repeat run kept beside it
    u = models["tiny, unique prompts"]
    assert [(r["completed"], r["lost"], r["accepted"]) for r in u["runs"]] == [(4, 0, 4)]
    assert "## tiny, unique prompts" in (tmp_path / "serve_load.md").read_text()


def test_serve_load_unique_workload_shares_only_the_system_prompt():
    from bench import serve_load

    reqs = [serve_load.workload(i, 8, "long text", "unique", "sys") for i in range(12)]
    assert all(m[0] == {"role": "system", "content": "sys"} for m, _ in reqs)
    assert len({m[1]["content"] for m, _ in reqs}) == 12  # no two user turns alike
    assert [n for _, n in reqs[:4]] == [32, 8, 8, 8]
    assert serve_load.workload(1, 8, "long text")[0] == [{"role": "user", "content": "long text"}]


def test_default_model_chat_stream_and_audit(smollm2, tmp_path):
    """The real default model behind the server: a streamed chat answer, then audited."""
    res = cli.invoke(verifier_app, ["keygen", "--model", "default", "--out", str(tmp_path / "key")])
    assert res.exit_code == 0, res.output
    srv = ThreadServer("default", tmp_path / "store")
    try:
        req = {"model": "default", "messages": [{"role": "user", "content": "Name a river."}],
               "max_tokens": 5, "temperature": 0.7, "seed": 3}
        chunks = list(client(srv).chat.completions.create(**req, stream=True))
        receipt = chunks[-1].receipt
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == receipt["text"]
        (tmp_path / "r.json").write_text(json.dumps({"request": req, "receipt": receipt}))
        res = _audit(srv, tmp_path / "key", "--receipts", str(tmp_path / "r.json"))
    finally:
        srv.stop()
    assert res.exit_code == 0, res.output
    assert "1 of 1 receipts audited: 1 accepted" in res.output


def test_completion_stream(server):
    c = client(server)
    chunks = list(c.completions.create(model="tiny", prompt="stream", max_tokens=5, stream=True,
                                       temperature=0, stream_options={"include_usage": True}))
    receipt = next(ch for ch in chunks if getattr(ch, "receipt", None)).receipt
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == receipt["text"]
    assert chunks[-1].usage.completion_tokens == len(receipt["output_token_ids"])


def test_audit_refuses_an_opening_over_the_size_limit(server, model_and_key):
    from commitllm.keys.keygen import key_tokenizer, load_key
    from commitllm.verifier.audit import Item, audit_item
    from commitllm.verifier.client import Exchange

    c = client(server)
    r = c.completions.create(model="tiny", prompt="big", max_tokens=3).receipt
    key = load_key(model_and_key[1])
    row = audit_item(key, key_tokenizer(key), server.url, Item("t", Exchange(r)), "full", 1000, 30)
    assert not row.verdict.accepted and row.verdict.reason == "opening_unavailable"
    assert "exceeds the 1000-byte limit" in row.verdict.detail


def test_audit_cannot_reach_the_server(model_and_key, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"receipt_id": "0" * 64}))
    res = cli.invoke(verifier_app, ["audit", "--server", f"http://127.0.0.1:{free_port()}",
                                    "--key", str(model_and_key[1])])
    assert res.exit_code == 2 and "unreachable" in res.output
    res = cli.invoke(verifier_app, ["audit", "--server", "http://127.0.0.1:1", "--key",
                                    str(model_and_key[1]), "--receipts", str(tmp_path / "r.json")])
    assert res.exit_code == 1  # a malformed receipt is a rejection, not a crash
    res = cli.invoke(verifier_app, ["audit", "--server", "http://x", "--key",
                                    str(model_and_key[1]), "--rate", "0"])
    assert res.exit_code == 2 and "--rate" in res.output


def _status(url: str, path: str, body: bytes | None, auth: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=body,
                                 headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


CLIENT_PATHS = [("/v1/models", None), ("/v1/commitment", None), ("/v1/stats", None),
                ("/openapi.json", None), ("/docs", None),
                ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [
                    {"role": "user", "content": "a"}]}).encode())]
AUDIT_PATHS = [("/v1/receipts", None), ("/v1/audit", b'{"mac": "x"}')]


def test_api_key_and_audit_key_guard_every_endpoint(model_and_key, tmp_path, monkeypatch):
    """--api-key guards every client endpoint and the API description (401 without it); the
    audit endpoints need the separate --audit-key: 401 without a key, 403 with a client key;
    the openai client with the API key is served; commitllm audit sends the audit key (or
    exits 2 without it)."""
    monkeypatch.delenv("COMMITLLM_AUDIT_KEY", raising=False)
    srv = ThreadServer(model_and_key[0], tmp_path / "store", api_key="s3cret-key",
                       audit_key="audit-key")
    try:
        for auth in (None, "Bearer wrong", "Basic s3cret-key", "Bearer s3cret-key-and-more",
                     "Bearer audit-key"):
            for path, body in CLIENT_PATHS:
                code, err = _status(srv.url, path, body, auth)
                assert code == 401 and err["error"]["code"] == "invalid_api_key", (path, auth)
        for auth, want in ((None, 401), ("Bearer wrong", 401), ("Bearer s3cret-key", 403)):
            for path, body in AUDIT_PATHS:
                assert _status(srv.url, path, body, auth)[0] == want, (path, auth)
        assert srv.worker.stats.requests == 0
        assert _status(srv.url, "/openapi.json", None, "Bearer s3cret-key")[0] == 200
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret-key", max_retries=0)
        r = c.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                      messages=[{"role": "user", "content": "hi"}])
        (tmp_path / "r.json").write_text(json.dumps(r.receipt))
        key = model_and_key[1]
        res = _audit(srv, key, "--receipts", str(tmp_path / "r.json"))
        assert res.exit_code == 2 and "audit key" in res.output, res.output
        res = _audit(srv, key, "--audit-key", "s3cret-key")
        assert res.exit_code == 2 and "HTTP 403" in res.output, res.output
        res = _audit(srv, key, "--audit-key", "audit-key")
        assert res.exit_code == 0 and "1 accepted, 0 rejected" in res.output, res.output
        res = cli.invoke(verifier_app, ["audit", "--server", srv.url, "--key", str(key)],
                         env={"COMMITLLM_AUDIT_KEY": "audit-key"})
        assert res.exit_code == 0, res.output
    finally:
        srv.stop()


def test_client_keys_without_an_audit_key_audit_no_one(model_and_key, tmp_path):
    srv = ThreadServer(model_and_key[0], tmp_path / "store", api_key="s3cret-key")
    try:
        for path, body in AUDIT_PATHS:
            code, err = _status(srv.url, path, body, "Bearer s3cret-key")
            assert code == 403 and "no audit key" in err["error"]["message"]
    finally:
        srv.stop()
    with pytest.raises(Exception, match="differ"):
        ThreadServer(model_and_key[0], tmp_path / "store2", api_key="k", audit_key="k")


def test_worker_cancel_drops_a_sequence_without_touching_its_batch(server, tmp_path):
    """A job cancelled mid-generation stops at once (no more tokens), gets no receipt and no row;
    the request it shared its batch with gets the receipt it gets alone, byte for byte."""
    from commitllm.engine.receipts import SeqRequest
    from commitllm.engine.serve.store import SqliteStore
    from commitllm.engine.serve.worker import Cancelled, Job, Worker
    from commitllm.verifier.numerics.sampler import SamplingParams

    w0, tok = server.worker, server.worker.tokenizer
    keep = SeqRequest({"prompt": "keep"}, tok.encode("keep"), SamplingParams(0.8, 0, 1.0, 9), 12,
                      "n", b"k" * 16)
    drop = SeqRequest({"prompt": "drop me"}, tok.encode("drop me"), SamplingParams(), 40, "n",
                      b"d" * 16)
    seen = []
    victim = Job(drop)

    def on_token(t):
        seen.append(t)
        if len(seen) == 3:
            victim.cancelled = True
    victim.on_token = on_token

    with w0.lock:
        store = SqliteStore(tmp_path / "s")
        w = Worker(w0.model, tok, w0.eos_ids, store, {}, start=False)
        kept, gone = w.submit(Job(keep)), w.submit(victim)
        w.start()
        with pytest.raises(Cancelled):
            gone.result(timeout=60)
        together = kept.result(timeout=60)[0]
        alone = w.submit(Job(keep)).result(timeout=60)[0]
        w.stop()
    assert len(seen) == 3 and w.stats.cancelled == 1 and w.stats.largest_batch == 2
    assert together == alone
    assert store.count() == 1  # the kept receipt (stored twice under one id), nothing for the other
    store.close()


def test_client_disconnect_mid_stream_cancels_its_generation(model_and_key, tmp_path,
                                                             monkeypatch):
    import httpx
    from commitllm.engine.serve import app as app_module

    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 0.01)  # the tiny model is fast

    srv = ThreadServer(model_and_key[0], tmp_path / "store")
    try:
        body = {"model": "tiny", "prompt": "go on and on", "max_tokens": 200, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first token arrived: generation is under way
        deadline = time.monotonic() + 20
        while srv.worker.stats.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.worker.stats.cancelled == 1
        assert srv.store.count() == 0  # no receipt was made for it
        stats = json.loads(urllib.request.urlopen(f"{srv.url}/v1/stats", timeout=10).read())
        assert stats["cancelled"] == 1 and stats["in_flight"] == 0

        # A non-streaming request whose client hangs up: noticed within the poll interval.
        import socket

        data = json.dumps(body | {"stream": False}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + str(len(data)).encode()
                         + b"\r\n\r\n" + data)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and json.loads(urllib.request.urlopen(
                    f"{srv.url}/v1/stats", timeout=10).read())["in_flight"] == 0:
                time.sleep(0.005)  # until the server has read it; then the client hangs up
        deadline = time.monotonic() + 20
        while srv.worker.stats.cancelled < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.worker.stats.cancelled == 2 and srv.store.count() == 0
    finally:
        srv.stop()


def test_text_deltas_wait_for_whole_characters_and_prefixes():
    """The shared streaming decoder (CLI and SSE): nothing while a character is incomplete or the
    decoded prefix changed what was shown; rest() completes the shown text to the final one."""
    from commitllm.engine.generate import TextDeltas

    class Tok:  # token i decodes to pieces[i]; "\ufffd" stands for a partial UTF-8 sequence
        pieces = {1: "ab", 2: "\ufffd", 3: "é", 4: "!"}

        def decode(self, ids):
            text = "".join(self.pieces[i] for i in ids)
            return text.replace("\ufffdé", "é") if ids[-1] != 4 else "AB" + text[2:]

    d = TextDeltas(Tok())
    assert [d.push(t) for t in (1, 2, 3)] == ["ab", "", "é"]
    assert d.push(4) == ""  # "ABé!" does not extend "abé": held back
    assert d.rest("abé!") == "!" and d.rest("ABé!") == ""


def _doc_example() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "SERVING.md").read_text()
    part = text.split("## The client side: save each exchange as it happens, audit later")[1]
    return part.split("```python\n")[1].split("```")[0]


def test_serving_doc_example(server, model_and_key, tmp_path):
    """docs/SERVING.md's client example, run as written against a server, then audited: every
    row has its request and its text checked."""
    saved = tmp_path / "saved"
    exec(compile(_doc_example(), "SERVING.md", "exec"),
         {"BASE_URL": f"{server.url}/v1", "SAVE_DIR": str(saved), "MODEL": "tiny"})
    assert sorted(p.name for p in saved.iterdir()) == ["chat.json", "story.json"]
    res = _audit(server, model_and_key[1], "--receipts", str(saved), "--json", "--tier", "full")
    rows = json.loads(res.stdout)["rows"]  # `audit --json`: one document
    assert res.exit_code == 0 and len(rows) == 2, res.output
    assert all(r["accepted"] and r["request_checked"] and r["text_checked"] for r in rows), rows
    story = json.loads((saved / "story.json").read_text())
    story["chunks"][0]["choices"][0]["text"] += "!"  # what the client read, altered
    (saved / "story.json").write_text(json.dumps(story))
    res = _audit(server, model_and_key[1], "--receipts", str(saved / "story.json"), "--json")
    assert res.exit_code == 1 and '"text_mismatch"' in res.stdout


FORMS = [  # (endpoint, body) the server accepts; each must verify with its request checked
    ("/v1/completions", {"prompt": ["abc"], "max_tokens": 3, "temperature": 0}),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 3, "temperature": 1, "top_p": 1,
                         "top_k": 0, "seed": 5, "nonce": "n-1", "user": "u", "n": 1,
                         "stop": None, "logprobs": False, "echo": False, "best_of": 1,
                         "suffix": "", "presence_penalty": 0, "frequency_penalty": 0.0,
                         "logit_bias": {}}),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 3, "temperature": 0.7, "top_p": 0.9,
                         "top_k": 5}),  # no seed: the one the nonce implies
    ("/v1/completions", {"prompt": "abc", "max_tokens": 3, "temperature": 0.7,
                         "nonce": "n-2"}),  # no seed, the client's nonce
    ("/v1/completions", {"prompt": "abc", "temperature": 0}),  # no max_tokens: 16
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "temperature": 0.8}),  # no max_tokens: the rest of the context
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 3, "temperature": 0, "tools": [],
                              "tool_choice": "none", "response_format": {"type": "text"},
                              "parallel_tool_calls": None, "top_logprobs": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                              "max_completion_tokens": 3, "seed": 2**64 - 1}),
]


@pytest.mark.parametrize("form", range(len(FORMS)))
def test_every_accepted_request_form_verifies(server, model_and_key, tmp_path, form):
    endpoint, body = FORMS[form]
    body = {"model": "tiny", **body}
    req = urllib.request.Request(server.url + endpoint, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        resp = json.loads(r.read())
    (tmp_path / "x.json").write_text(json.dumps({"endpoint": endpoint, "request": body,
                                                 "response": resp}))
    res = _audit(server, model_and_key[1], "--receipts", str(tmp_path / "x.json"), "--json")
    (row,) = json.loads(res.stdout)["rows"]
    assert res.exit_code == 0 and row["request_checked"] and row["text_checked"], res.output


@pytest.mark.parametrize("extra", [{"stop": [""]}, {"logprobs": 1}, {"top_logprobs": 2},
                                   {"echo": True}, {"stop_token_ids": [-1]}, {"foo": 1},
                                   {"max_tokens": 3, "max_completion_tokens": 4},
                                   {"top_k": 1.5}, {"seed": -1}, {"top_p": 0},
                                   {"nonce": "\ud800"}, {"user": "\udfff"}])
def test_server_and_verifier_refuse_the_same_fields(server, extra):
    """What the verifier refuses (request_invalid), the server refuses with 400: one list."""
    from commitllm.verifier import request as request_mod

    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(request_mod.RequestError):
        request_mod.parse(body, endpoint="/v1/chat/completions")
    req = urllib.request.Request(server.url + "/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400


class _Tok:
    chat_template = "t"

    def encode(self, text):
        return [1] * len(text)

    def encode_chat(self, messages):
        return [1] * sum(len(m["content"]) for m in messages)


@pytest.mark.parametrize("kind,body,cap,want", [
    ("completion", {"prompt": "abcd"}, None, 16),  # OpenAI's default for completions
    ("completion", {"prompt": "a" * 60}, None, 4),  # within the context (64)
    ("chat", {"messages": [{"role": "user", "content": "abcd"}]}, None, 60),  # the rest
    ("chat", {"messages": [{"role": "user", "content": "abcd"}], "max_tokens": 7}, 8, 7),
    ("chat", {"messages": [{"role": "user", "content": "abcd"}]}, 8, 400),  # over the cap
    ("completion", {"prompt": "abcd", "max_tokens": 9}, 8, 400),
])
def test_default_max_tokens_and_cap(kind, body, cap, want):
    """The server's max_tokens is the protocol's rule (what the verifier checks) unless the
    client fixed it; --max-tokens-cap refuses, never silently lowers, what would exceed it."""
    from commitllm.engine.serve.protocol import ApiError, Limits, parse
    from commitllm.verifier import request as request_mod

    try:
        got = parse({"model": "m", **body}, kind, "m", _Tok(), Limits(64, cap))
    except ApiError as e:
        assert want == 400 and e.status == 400
        return
    assert got.seq.max_tokens == want
    seed = got.seq.params.seed  # no seed sent: the one the (server's) nonce implies
    assert seed == request_mod.default_seed(got.seq.nonce)


# --- stop sequences, logprobs, echo: bound in the receipt, checked by the verifier --------------

def _post_json(srv, endpoint, body):
    req = urllib.request.Request(srv.url + endpoint, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _audit_one(srv, key, tmp_path, endpoint, body, resp, *extra):
    (tmp_path / "x.json").write_text(json.dumps({"endpoint": endpoint, "request": body,
                                                 "response": resp}))
    return _audit(srv, key, "--receipts", str(tmp_path / "x.json"), "--json", *extra)


def test_stop_string_cuts_the_text_and_verifies(server, model_and_key, tmp_path):
    base = {"model": "tiny", "prompt": "abc", "max_tokens": 12, "temperature": 0}
    full = _post_json(server, "/v1/completions", base)["choices"][0]["text"]
    assert len(full) >= 4, full
    stop = full[2:4]  # occurs in the unstopped output: generation must end there
    resp = _post_json(server, "/v1/completions", base | {"stop": [stop]})
    choice = resp["choices"][0]
    assert choice["text"] == full[:full.index(stop)] and choice["finish_reason"] == "stop"
    assert resp["receipt"]["manifest"]["output"]["stop"] == [stop]
    res = _audit_one(server, model_and_key[1], tmp_path, "/v1/completions",
                     base | {"stop": [stop]}, resp, "--tier", "full")
    (row,) = json.loads(res.stdout)["rows"]
    assert res.exit_code == 0 and row["accepted"] and row["text_checked"], res.output


def test_logprobs_and_echo_verify_at_prompt_and_output_positions(server, model_and_key,
                                                                 tmp_path):
    body = {"model": "tiny", "prompt": "abcab", "max_tokens": 1, "temperature": 0,
            "logprobs": 2, "echo": True}  # what lm-eval sends for a log-likelihood
    resp = _post_json(server, "/v1/completions", body)
    lp, r = resp["choices"][0]["logprobs"], resp["receipt"]
    n_p = len(r["prompt_token_ids"])
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == n_p + 1
    assert all(x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    assert resp["choices"][0]["text"] == "abcab" + r["text"]
    assert r["logprobs"]["prompt"][0][0] == lp["token_logprobs"][1]
    # the greedy token is the top-ranked one, with the same canonical value
    assert r["logprobs"]["output"][0][1][0] == [r["output_token_ids"][0],
                                                 r["logprobs"]["output"][0][0]]
    res = _audit_one(server, model_and_key[1], tmp_path, "/v1/completions", body, resp,
                     "--tier", "deep")
    assert res.exit_code == 0, res.output
    # a forged prompt logprob, receipt id recomputed (a provider's own receipt): rejected at
    # a challenged prompt position (deep tier challenges them all)
    from commitllm.verifier.receipt import build_receipt
    forged = json.loads(json.dumps(r))
    forged["logprobs"]["prompt"][1][0] -= 0.5
    forged = build_receipt(forged["manifest"], forged["request"], forged["nonce"],
                           forged["prompt_token_ids"], forged["output_token_ids"],
                           forged["text"], forged["trace"], forged["logprobs"])
    server.store.put(forged, 0, b"\0" * 16, server.worker.extra)  # greedy: seed unused
    res = _audit_one(server, model_and_key[1], tmp_path, "/v1/completions", body,
                     resp | {"receipt": forged}, "--tier", "deep")
    assert res.exit_code == 1 and '"logprobs"' in res.stdout, res.output


def test_chat_logprobs_and_token_prompts_verify(server, model_and_key, tmp_path):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, "logprobs": True, "top_logprobs": 3}
    resp = _post_json(server, "/v1/chat/completions", body)
    content = resp["choices"][0]["logprobs"]["content"]
    assert len(content) == len(resp["receipt"]["output_token_ids"])
    assert all(len(c["top_logprobs"]) == 3 for c in content)
    res = _audit_one(server, model_and_key[1], tmp_path, "/v1/chat/completions", body, resp,
                     "--tier", "full")
    assert res.exit_code == 0, res.output
    ids = resp["receipt"]["prompt_token_ids"][:4]
    body = {"model": "tiny", "prompt": [ids], "max_tokens": 2, "temperature": 0,
            "stop_token_ids": [ids[0]]}
    resp = _post_json(server, "/v1/completions", body)
    assert resp["receipt"]["prompt_token_ids"] == ids
    res = _audit_one(server, model_and_key[1], tmp_path, "/v1/completions", body, resp)
    assert res.exit_code == 0, res.output


def test_stop_strings_never_stream_past_the_cut(server):
    base = {"model": "tiny", "prompt": "abc", "max_tokens": 12, "temperature": 0}
    full = _post_json(server, "/v1/completions", base)["choices"][0]["text"]
    stop = full[3:5]
    got = "".join(c.choices[0].text for c in client(server).completions.create(
        **base, stop=[stop], stream=True))
    assert got == full[:full.index(stop)]


def test_streamed_echo_and_stop_exchange_audits_with_its_text(server, model_and_key, tmp_path):
    """A streamed completion with echo and a stop string, saved as the client read it: the
    audit checks the text it saw (the prompt, then the cut text) against the receipt."""
    base = {"model": "tiny", "prompt": "abc", "max_tokens": 12, "temperature": 0}
    full = _post_json(server, "/v1/completions", base)["choices"][0]["text"]
    body = base | {"stop": [full[3:5]], "echo": True, "stream": True}
    chunks = [c.model_dump() for c in client(server).completions.create(**body)]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "abc" + full[:full.index(full[3:5])]
    (tmp_path / "s.json").write_text(json.dumps({"endpoint": "/v1/completions", "request": body,
                                                 "chunks": chunks}))
    res = _audit(server, model_and_key[1], "--receipts", str(tmp_path / "s.json"), "--json")
    (row,) = json.loads(res.stdout)["rows"]
    assert res.exit_code == 0 and row["text_checked"] and row["request_checked"], res.output
    chunks[0]["choices"][0]["text"] = "abd"  # the echoed prompt, altered
    (tmp_path / "s.json").write_text(json.dumps({"endpoint": "/v1/completions", "request": body,
                                                 "chunks": chunks}))
    res = _audit(server, model_and_key[1], "--receipts", str(tmp_path / "s.json"), "--json")
    assert res.exit_code == 1 and '"text_mismatch"' in res.stdout, res.output


def test_prefix_cache_hits_in_stats_and_receipts_audit(server, model_and_key, tmp_path):
    """Chat requests sharing a system prompt hit the prefix cache (/v1/stats); their receipts are
    the bytes a cold server gives and audit as accepted."""
    c = client(server)
    model_id = c.models.list().data[0].id
    system = {"role": "system", "content": "you answer every question in exactly one word."}
    reqs = [{"model": model_id, "messages": [system, {"role": "user", "content": q}],
             "max_tokens": 4, "temperature": 0, "nonce": f"prefix-{q}"}
            for q in ("sky?", "sea?", "sun?")]
    send = lambda cl, r: cl.chat.completions.create(  # noqa: E731
        **{k: v for k, v in r.items() if k != "nonce"}, extra_body={"nonce": r["nonce"]})
    with urllib.request.urlopen(f"{server.url}/v1/stats") as resp:
        before = json.loads(resp.read())["kv_cache"]["prefix_cache"]
    got = [send(c, r) for r in reqs]
    with urllib.request.urlopen(f"{server.url}/v1/stats") as resp:
        stats = json.loads(resp.read())
    after = stats["kv_cache"]["prefix_cache"]
    assert stats["batching"] == "continuous" and stats["kv_cache"]["bytes"] > 0
    assert after["hits"] - before["hits"] >= 2 and after["hit_tokens"] > before["hit_tokens"]
    cold = ThreadServer(model_and_key[0], tmp_path / "cold", prefix_cache=False)
    try:
        c2 = client(cold)
        fresh = [send(c2, r) for r in reqs]
        with urllib.request.urlopen(f"{cold.url}/v1/stats") as resp:
            assert "prefix_cache" not in json.loads(resp.read())["kv_cache"]
    finally:
        cold.stop()
    assert [g.receipt for g in got] == [f.receipt for f in fresh]  # greedy: no salt
    for i, (r, g) in enumerate(zip(reqs, got)):
        (tmp_path / f"{i}.json").write_text(json.dumps({"request": r, "receipt": g.receipt}))
    res = _audit(server, model_and_key[1], "--receipts", str(tmp_path), "--tier", "full")
    assert res.exit_code == 0, res.output
    assert "3 of 3 receipts audited: 3 accepted" in res.output

"""`commitllm-engine serve` says where it listens, and logs one access line per request (method,
path, status, tokens generated, milliseconds)."""

from __future__ import annotations

import json
import re
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from tinymodels import make_tiny_chat_model

pytest.importorskip("fastapi")
sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench` (last: kernels/ must not shadow)
from bench.serve_load import free_port, start_server


def _post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def test_listening_line_and_access_log(tmp_path):
    model = make_tiny_chat_model(tmp_path / "tiny")
    port = free_port()
    proc = start_server(model, tmp_path / "store", port)
    base = f"http://127.0.0.1:{port}"
    try:
        ans = json.loads(_post(f"{base}/v1/completions", {"model": "tiny", "prompt": "ab",
                                                          "max_tokens": 5}))
        n = len(ans["receipt"]["output_token_ids"])
        sse = _post(f"{base}/v1/chat/completions",
                    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 4, "stream": True})
        m = len(json.loads([ln for ln in sse.decode().splitlines() if '"receipt"' in ln][0][5:])
                ["receipt"]["output_token_ids"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    proc.log.seek(0)
    log = proc.log.read().decode()
    assert f"listening on http://127.0.0.1:{port} " in log, log
    lines = [ln for ln in log.splitlines() if " HTTP/" in ln]
    assert re.search(rf'^127\.0\.0\.1:\d+ - "GET /v1/models HTTP/1\.1" 200 - tokens \d+ ms$',
                     lines[0]), lines  # start_server's readiness probe
    assert re.search(rf'"POST /v1/completions HTTP/1\.1" 200 {n} tokens \d+ ms$', log, re.M), log
    assert re.search(rf'"POST /v1/chat/completions HTTP/1\.1" 200 {m} tokens \d+ ms$', log,
                     re.M), log

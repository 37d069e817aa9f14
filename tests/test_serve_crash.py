"""Crash test: SIGKILL the server in the middle of a load, restart it on the same store, and audit
every receipt it returned before the kill: each one must still open and verify."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from commitllm.verifier.cli import app as verifier_app
from tinymodels import make_tiny_chat_model
from typer.testing import CliRunner

openai = pytest.importorskip("openai")
sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench` (last: kernels/ must not shadow)
from bench.serve_load import free_port, start_server

cli = CliRunner()


def load(port: int, got: list, stop: threading.Event, lock: threading.Lock, i: int) -> None:
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                      timeout=60)
    n = 0
    while not stop.is_set():
        req = {"model": "tiny", "prompt": f"client {i} request {n}", "max_tokens": 6 + n % 5,
               "temperature": 0.8, "seed": 1000 * i + n, "nonce": f"c{i}-{n}"}
        n += 1
        try:
            r = c.completions.create(**{k: v for k, v in req.items() if k != "nonce"},
                                     extra_body={"nonce": req["nonce"]})
        except openai.APIError:
            return  # the server died under us: this request got no receipt
        with lock:
            got.append({"request": req, "response": r.model_dump()})


def test_receipts_survive_sigkill(tmp_path):
    model = make_tiny_chat_model(tmp_path / "tiny")
    res = cli.invoke(verifier_app, ["keygen", "--model", str(model), "--out", str(tmp_path / "key")])
    assert res.exit_code == 0, res.output
    port, store = free_port(), tmp_path / "store"
    proc = start_server(model, store, port)
    got, stop, lock = [], threading.Event(), threading.Lock()
    threads = [threading.Thread(target=load, args=(port, got, stop, lock, i)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        while len(got) < 12 and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-load: requests are in flight
        proc.wait(timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        if proc.poll() is None:
            proc.kill()
    assert len(got) >= 12
    receipts = tmp_path / "receipts"
    receipts.mkdir()
    for j, g in enumerate(got):
        (receipts / f"{j:04d}.json").write_text(json.dumps(g))
    port2 = free_port()
    proc = start_server(model, store, port2)
    try:
        res = cli.invoke(verifier_app, ["audit", "--server", f"http://127.0.0.1:{port2}",
                                        "--key", str(tmp_path / "key"), "--receipts", str(receipts)])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert res.exit_code == 0, res.output
    assert f"{len(got)} of {len(got)} receipts audited: {len(got)} accepted, 0 rejected" in res.output

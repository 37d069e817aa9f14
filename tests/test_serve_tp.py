"""`commitllm-engine serve --tp 2`: the server shards its model over two gloo ranks. Its answers are
the single-process server's (same ids, same text), its receipts audit with the key built for the
unsharded model, idle followers are kept alive by heartbeats past the collective timeout, and a
killed follower stops the server with an error; what it returned before then still audits from a
single-process server on the same store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commitllm.verifier.cli import app as verifier_app
from test_tp import _alive, _children, _rank_of
from tinymodels import TINY_KINDS, make_tiny_checkpoint, write_char_tokenizer
from typer.testing import CliRunner

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench` (last: kernels/ must not shadow)
from bench.serve_load import free_port, start_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
cli = CliRunner()
TIMEOUT_S = 4.0  # the followers' collective timeout: the idle wait below outlasts it
MESSAGES = [[{"role": "user", "content": "tell me"}], [{"role": "user", "content": "a story"}]]


def _ask(url: str, messages, **kw) -> dict:
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                  **kw)
    return r.model_dump()


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    proc.log.seek(0)  # start_server sends stderr to a file
    return proc.log.read().decode()


def _audit(url: str, key: Path, receipts: Path):
    return cli.invoke(verifier_app, ["audit", "--server", url, "--key", str(key),
                                     "--receipts", str(receipts), "--rate", "1", "--tier", "full",
                                     "--json"])


def _accepted(res) -> int:
    import json

    rows = json.loads(res.stdout)["rows"]  # `audit --json`: one document
    return sum(r["accepted"] for r in rows)


def test_serve_tp2_matches_tp1_survives_idle_and_stops_when_a_rank_dies(tmp_path):
    import json

    model = write_char_tokenizer(make_tiny_checkpoint(tmp_path / "tiny", "llama"),
                                 TINY_KINDS["llama"]["vocab_size"])
    key = tmp_path / "key"
    assert cli.invoke(verifier_app, ["keygen", "--model", str(model), "--out", str(key)]
                      ).exit_code == 0
    store = tmp_path / "store"

    # The single-process server's answers, for comparison.
    port = free_port()
    proc = start_server(model, tmp_path / "store1", port)
    try:
        want = [_ask(f"http://127.0.0.1:{port}", m) for m in MESSAGES]
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err  # SIGTERM: a clean shutdown

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model, store, port, "--tp", "2", "--tp-timeout", str(TIMEOUT_S),
                        "--served-name", "tiny")
    try:
        followers = {_rank_of(p): p for p in _children(proc.pid)}
        assert sorted(followers) == [1], followers
        got = [_ask(url, m) for m in MESSAGES]
        time.sleep(2.5 * TIMEOUT_S)  # idle: without heartbeats the follower would time out
        got.append(_ask(url, MESSAGES[0], stream=False))
        assert proc.poll() is None and _alive(followers[1])
        for g, w in zip(got, want + want[:1]):
            assert g["choices"][0]["message"] == w["choices"][0]["message"]
            for field in ("output_token_ids", "text", "manifest_hash", "prompt_token_ids"):
                assert g["receipt"][field] == w["receipt"][field]
        saved = tmp_path / "receipts"
        saved.mkdir()
        for i, g in enumerate(got):
            (saved / f"{i}.json").write_text(json.dumps(g["receipt"]))
        res = _audit(url, key, saved)  # openings re-executed by the sharded model
        assert res.exit_code == 0, res.output
        assert _accepted(res) == len(got), res.output

        os.kill(followers[1], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(openai.APIError):  # refused (503) or cut off; never a receipt
            _ask(url, MESSAGES[1])
        proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        err = _stop(proc)
    assert elapsed < 60
    assert proc.returncode == 1, err
    assert "the tensor-parallel group failed" in err, err

    # Every receipt returned before the failure opens from a single-process server on that store.
    port = free_port()
    proc = start_server(model, store, port, "--served-name", "tiny")
    try:
        res = _audit(f"http://127.0.0.1:{port}", key, saved)
    finally:
        _stop(proc)
    assert res.exit_code == 0, res.output
    assert _accepted(res) == len(got), res.output


@pytest.mark.slow  # two more TP server starts; the TP serving path is covered by the test above
def test_serve_tp2_clean_stop_and_busy_port(tmp_path):
    """SIGTERM stops rank 0 and its follower cleanly (exit 0, no error); a port already in use
    is an error (exit 1), and the follower it started is stopped too."""
    import socket

    model = write_char_tokenizer(make_tiny_checkpoint(tmp_path / "tiny", "llama"),
                                 TINY_KINDS["llama"]["vocab_size"])
    port = free_port()
    proc = start_server(model, tmp_path / "store", port, "--tp", "2")
    followers = _children(proc.pid)
    err = _stop(proc)
    assert proc.returncode == 0, err
    assert "error" not in err.lower(), err
    assert not any(map(_alive, followers))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        exe = Path(sys.executable).parent / "commitllm-engine"
        res = subprocess.run([str(exe), "serve", "--model", str(model), "--store",
                              str(tmp_path / "store"), "--port", str(busy), "--tp", "2"],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert f"error: could not serve on 127.0.0.1:{busy}" in res.stderr

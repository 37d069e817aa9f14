"""The protocol through its command lines: keygen, generate --receipt --store, challenge, open,
verify (exit 0 accept / 1 reject / 2 malformed), --audit, and verify without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from commitllm.engine.cli import app as engine_app
from commitllm.verifier import container
from commitllm.verifier.cli import app as verifier_app
from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION, unpack_acc

from accs import add_acc
from test_no_torch import BLOCKER

runner = CliRunner()


@pytest.fixture(scope="module")
def signed(smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("proto")
    res = runner.invoke(verifier_app, ["keygen", "--out", str(d / "key"), "--public"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model_commitment"]
    res = runner.invoke(engine_app, ["generate", "Name two rivers.", "--max-tokens", "16",
                                     "--receipt", str(d / "r.json"), "--store", str(d / "st"),
                                     "--nonce", "client-7", "--temperature", "0.8", "--seed", "5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(verifier_app, ["challenge", "--key", str(d / "key"), "--receipt",
                                       str(d / "r.json"), "--tier", "full", "--out", str(d / "c.json")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(engine_app, ["open", "--store", str(d / "st"), "--challenge",
                                     str(d / "c.json"), "--out", str(d / "o.bin")])
    assert res.exit_code == 0, res.output
    return d


def _verify(d, opening="o.bin", receipt="r.json", *extra):
    return runner.invoke(verifier_app, ["verify", "--key", str(d / "key"), "--receipt",
                                        str(d / receipt), "--challenge", str(d / "c.json"),
                                        "--opening", str(d / opening), *extra])


def test_cli_flow_accepts(signed):
    r = json.loads((signed / "r.json").read_text())
    assert r["nonce"] == "client-7" and r["manifest"]["seed_commitment"]
    store_files = list((signed / "st").iterdir())
    assert [p.name for p in store_files] == [f"{r['receipt_id']}.json"]
    stored = json.loads(store_files[0].read_text())
    assert set(stored) == {"receipt", "seed", "salt", "model", "profile"}  # no activations kept
    res = _verify(signed, "o.bin", "r.json", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["accepted"] and all(c["ok"] for c in out["checks"])


def test_key_is_private(signed):
    assert (signed / "key").stat().st_mode & 0o777 == 0o600


def test_tampered_opening_exit_1(signed, tmp_path):
    meta, arrays = container.read(signed / "o.bin", OPENING_MAGIC, OPENING_VERSION, 1 << 32)
    arrays = {k: np.array(v) for k, v in arrays.items()}
    add_acc(arrays, "z.3.down", (0, 0), 7)
    container.write(signed / "o2.bin", OPENING_MAGIC, OPENING_VERSION, meta, arrays)
    res = _verify(signed, "o2.bin")
    assert res.exit_code == 1 and "freivalds_down" in res.output


def test_version_1_opening_refused_with_what_to_do(signed):
    """An opening in the old format (version 1: int64 accumulators) is refused before anything
    reads it, exit 2, saying to open the receipt again."""
    meta, arrays = container.read(signed / "o.bin", OPENING_MAGIC, OPENING_VERSION, 1 << 32)
    old = {k: unpack_acc(v) if v.dtype == np.uint8 and k.startswith(("z.", "zq.")) else v
           for k, v in arrays.items()}
    container.write(signed / "v1.bin", OPENING_MAGIC, 1, meta, old)
    res = _verify(signed, "v1.bin")
    assert res.exit_code == 2, res.output
    assert "unsupported version 1 (expected 2)" in res.output
    assert "open the receipt again" in res.output


def test_malformed_inputs_exit_2(signed):
    (signed / "junk.bin").write_bytes(b"\x00" * 64)
    res = _verify(signed, "junk.bin")
    assert res.exit_code == 2 and "magic" in res.output
    (signed / "bad.json").write_text("{not json")
    res = _verify(signed, "o.bin", "bad.json")
    assert res.exit_code == 2
    (signed / "empty.json").write_text("{}")
    res = _verify(signed, "o.bin", "empty.json")
    assert res.exit_code == 2 and "receipt_malformed" in res.output


def test_open_refuses_unknown_receipt(signed, tmp_path):
    c = json.loads((signed / "c.json").read_text())
    c["receipt_id"] = "ab" * 32
    (tmp_path / "c.json").write_text(json.dumps(c))
    res = runner.invoke(engine_app, ["open", "--store", str(signed / "st"), "--challenge",
                                     str(tmp_path / "c.json"), "--out", str(tmp_path / "o.bin")])
    assert res.exit_code == 2 and "no transcript" in res.output
    assert not (tmp_path / "o.bin").exists()


def test_verify_runs_without_torch(signed, tmp_path):
    code = f"""
import sys
from commitllm.verifier.cli import app
sys.argv = ['commitllm', 'verify', '--key', {str(signed / 'key')!r}, '--receipt',
            {str(signed / 'r.json')!r}, '--challenge', {str(signed / 'c.json')!r},
            '--opening', {str(signed / 'o.bin')!r}, '--json']
app()
"""
    script = tmp_path / "v.py"
    script.write_text(BLOCKER + code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accepted"] is True


def test_generate_audit_demo(smollm2):
    res = runner.invoke(engine_app, ["generate", "Say hello.", "--max-tokens", "8", "--audit", "--json"])
    assert res.exit_code == 0, res.output
    audit = json.loads(res.stdout)  # exactly one JSON document: the result, the audit inside
    assert audit["token_ids"] and audit["receipt"]["receipt_id"] == audit["audit"][0]["receipt_id"]
    row = audit["audit"][0]
    assert row["accepted"] and row["challenged_positions"] >= 1
    assert "ACCEPTED" in res.output

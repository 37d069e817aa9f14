"""Key integrity: a key file carries a MAC under a key derived from its own secret, over every
metadata field (tokenizer and chat template included) and every array; load_key refuses a
tampered, group- or world-readable or stale-format key with one line saying what to do. A key
without a tokenizer cannot silently switch off prompt and output binding: verify rejects
(io_binding_unavailable) unless told io_binding=False, and then says NOT CHECKED."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from advworld import NONCE, assert_rejected
from commitllm.keys.keygen import KEY_MAGIC, KEY_VERSION, load_key, save_key
from commitllm.verifier import container
from commitllm.verifier.cli import app as verifier_app
from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
from typer.testing import CliRunner


def _saved(w, tmp_path, name="k.key"):
    path = tmp_path / name
    save_key(w.key, path)
    return path


def _rewrite(path, edit_meta=None, edit_arrays=None, version=KEY_VERSION, mode=0o600):
    """The key file re-written with fields edited (what someone without the secret can do)."""
    meta, arrays = container.read(path, KEY_MAGIC, KEY_VERSION, 1 << 34)
    arrays = {k: np.array(v) for k, v in arrays.items()}
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    container.write(path, KEY_MAGIC, version, meta, arrays, mode=mode)
    os.chmod(path, mode)
    return path


def test_honest_key_round_trip_every_profile(pworld, tmp_path):
    path = _saved(pworld, tmp_path)
    k = load_key(path)
    assert k.meta == pworld.key.meta and k.secret == pworld.key.secret
    assert isinstance(k.meta["mac"], str) and len(k.meta["mac"]) == 64


META_EDITS = {
    "profile-kv-qmax": lambda m: m["profile"].__setitem__("kv_qmax", m["profile"]["kv_qmax"] - 1),
    "config-vocab": lambda m: m["config"].__setitem__("vocab_size", 64),
    "config-eos": lambda m: m["config"].__setitem__("eos_token_id", 7),
    "embed-root": lambda m: m.__setitem__("embed_root", "00" * 32),
    "model-commitment": lambda m: m.__setitem__("model_commitment", "11" * 32),
    "rows": lambda m: m["rows"].__setitem__("lm_head", 1),
    "mac-removed": lambda m: m.pop("mac"),
    "mac-zeroed": lambda m: m.__setitem__("mac", "0" * 64),
    "extra-field": lambda m: m.__setitem__("note", "hi"),
    "freivalds-scheme": lambda m: m.__setitem__("freivalds", {"primes": [2147483647],
                                                              "checks_per_prime": 2}),
}
ARRAY_EDITS = {
    "norm-weight": lambda a: a["final_norm"].__setitem__(0, a["final_norm"][0] * 2),
    "scale": lambda a: a["lm_head.s"].__setitem__(0, 1.0),
    "projection": lambda a: a["lm_head.v"].__setitem__(0, a["lm_head.v"][0] + 1),
    "secret": lambda a: a["secret"].__setitem__(0, a["secret"][0] ^ 1),
    "array-added": lambda a: a.__setitem__("extra", np.zeros(4, np.float32)),
    "array-removed": lambda a: a.pop("layers.0.attn_norm"),
}


@pytest.mark.parametrize("edit", sorted(META_EDITS) + sorted(ARRAY_EDITS))
def test_tampered_key_refused_at_load(pworld, tmp_path, edit):
    path = _saved(pworld, tmp_path)
    _rewrite(path, META_EDITS.get(edit), ARRAY_EDITS.get(edit))
    with pytest.raises(container.ContainerError, match="MAC|secret"):
        load_key(path)


TOKENIZER_EDITS = {
    "chat-template": lambda m: m["tokenizer"].__setitem__(
        "chat_template", m["tokenizer"]["chat_template"] + "{{ ' ' }}"),
    "tokenizer-json": lambda m: m["tokenizer"].__setitem__(
        "json", m["tokenizer"]["json"].replace('"unk_token"', '"unk_tokem"', 1)),
    "tokenizer-eos": lambda m: m["tokenizer"].__setitem__("eos_token_ids", [0]),
    "tokenizer-hash": lambda m: m.__setitem__("tokenizer_hash", "22" * 32),
    "tokenizer-removed": lambda m: m.__setitem__("tokenizer", None),
}


@pytest.mark.parametrize("edit", sorted(TOKENIZER_EDITS))
def test_tokenizer_or_template_swapped_refused(chat_world, tmp_path, edit):
    path = _saved(chat_world, tmp_path)
    _rewrite(path, TOKENIZER_EDITS[edit])
    with pytest.raises(container.ContainerError, match="MAC"):
        load_key(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_readable_by_others_refused(world, tmp_path, mode):
    path = _saved(world, tmp_path)
    os.chmod(path, mode)
    with pytest.raises(container.ContainerError, match="chmod 600"):
        load_key(path)
    os.chmod(path, 0o600)
    assert load_key(path).secret == world.key.secret


def test_stale_key_version_refused_with_advice(world, tmp_path):
    path = _saved(world, tmp_path)
    _rewrite(path, version=KEY_VERSION - 1)
    with pytest.raises(container.ContainerVersionError, match="keygen` again"):
        load_key(path)


def test_cached_key_rebuilds_a_damaged_one(world, tmp_path, monkeypatch):
    from commitllm.engine import receipts

    monkeypatch.setenv("COMMITLLM_CACHE", str(tmp_path))
    first = receipts.cached_key(world.qm, None)
    (path,) = (tmp_path / "keys").glob("*.key")
    assert f"-v{KEY_VERSION}-" in path.name  # and the spec digest: another spec, another key
    _rewrite(path, META_EDITS["embed-root"])
    again = receipts.cached_key(world.qm, None)
    assert again.meta["embed_root"] == first.meta["embed_root"] and again.secret != first.secret


# --- a key without a tokenizer ------------------------------------------------------------


def test_no_tokenizer_rejects_unless_told(pworld, popened):
    from commitllm.verifier.verify import verify

    w = pworld
    c, meta, arrays = popened
    assert w.vtok is None
    v = verify(w.key, w.served.receipt, c, meta, dict(arrays), None, NONCE)
    assert_rejected(v, "io_binding_unavailable")
    v = verify(w.key, w.served.receipt, c, meta, dict(arrays), None, NONCE, io_binding=False)
    assert v.accepted and v.unchecked == ["io_binding"]
    assert [x for x in v.checks if x["check"] == "io_binding"][0]["ok"] is None
    assert v.to_json()["unchecked"] == ["io_binding"]


def test_tokenizer_present_binding_checked(chat_world):
    v = chat_world.audit(chat_world.served, tier="routine")
    assert v.accepted and v.unchecked == []
    assert any(x["check"] == "io_binding" and x["ok"] for x in v.checks)


def test_cli_no_io_binding_flag(world, opened, tmp_path):
    c, meta, arrays = opened
    key = _saved(world, tmp_path)
    (tmp_path / "r.json").write_text(json.dumps(world.served.receipt))
    (tmp_path / "c.json").write_text(json.dumps(c))
    container.write(tmp_path / "o.bin", OPENING_MAGIC, OPENING_VERSION, meta, arrays)
    args = ["verify", "--key", str(key), "--receipt", str(tmp_path / "r.json"), "--challenge",
            str(tmp_path / "c.json"), "--opening", str(tmp_path / "o.bin")]
    res = CliRunner().invoke(verifier_app, args)
    assert res.exit_code == 1 and "io_binding_unavailable" in res.output, res.output
    res = CliRunner().invoke(verifier_app, args + ["--no-io-binding"])
    assert res.exit_code == 0, res.output
    assert "NOT CHECKED io_binding" in res.output
    assert "ACCEPTED (io_binding NOT CHECKED)" in res.output

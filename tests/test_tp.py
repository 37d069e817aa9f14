"""Tensor parallelism: TP 1/2/3 give the same token ids, the same receipt bytes and the same
opening bytes as the single-process engine; shapes that do not divide are refused clearly; a rank
killed mid-generation ends the job with an error on every rank and leaves no transcript behind.

The ranks are real processes over gloo: this test process is rank 0 (the engine spawns the
others), exactly as `commitllm-engine generate --tp N` runs.
"""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton-backend tests run the kernels on the interpreter; triton.jit reads this
# when a kernel module is imported, so it is set before anything imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from commitllm.engine.exact.model import ExactModel, SeqCache
from commitllm.engine.loader import load_model
from commitllm.engine.open import build_opening
from commitllm.engine.receipts import generate_with_receipts
from commitllm.engine.tp.comm import Comm
from commitllm.engine.tp.launch import start
from commitllm.engine.tp.model import TPModel
from commitllm.engine.tp.shard import ShapeError, make_plan
from commitllm.keys.keygen import build_key, key_tokenizer
from commitllm.verifier import challenge as ch
from commitllm.verifier import container
from commitllm.verifier.numerics import get_profile
from commitllm.verifier.numerics.sampler import SamplingParams
from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
from commitllm.verifier.verify import verify
from tinymodels import make_tiny_checkpoint

GREEDY, SAMPLED = SamplingParams(), SamplingParams(0.9, 30, 0.95, 4242)
# 12 heads over 6 K/V heads, intermediate 96: split by 2 and by 3; vocabulary 128 is not a
# multiple of 3, so TP=3 also exercises the padded last LM-head block.
DIVISIBLE = {"hidden_size": 96, "num_attention_heads": 12, "num_key_value_heads": 6,
             "intermediate_size": 96}
PROMPTS = [[5, 9, 14, 3, 77, 21, 8], [100, 4, 60]]


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe"]


def cases(default: set, *degrees: int) -> list:
    """(family, degree) cases, `slow` outside `default` (a set of families, or of (family,
    degree) pairs). The tiny families share every TP path except their own: Qwen2's QKV bias,
    Qwen3's per-head norms, Mistral's window (per head, nothing crosses ranks), Mixtral's split
    experts; the default suite runs each path once, -m slow runs them all."""
    out = []
    for fam in FAMILIES:
        for tp in degrees or (None,):
            on = fam in default or (fam, tp) in default
            vals = fam if tp is None else (fam, tp)
            out.append(pytest.param(*([vals] if tp is None else vals),
                                    marks=[] if on else [pytest.mark.slow]))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def tp_tiny(request, tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tp_{request.param}"), request.param,
                                  overrides=DIVISIBLE)
    loaded = load_model(str(folder), need_tokenizer=False)
    return folder, loaded, loaded.quantized(get_profile("w8a16"))


def _signed(model, params, qm):
    salts = [bytes([i]) * 16 for i in range(len(PROMPTS))]
    return generate_with_receipts(model, None, [{"prompt": str(p)} for p in PROMPTS],
                                  PROMPTS, params, 6, (qm.cfg.vocab_size - 1,), "nonce",
                                  prefill_chunk=4, salts=salts)


def _opening_bytes(model, signed, key, i=0):
    c = ch.derive(key.secret, signed.receipts[i], "full", nonce=b"n" * 16)
    meta, arrays = build_opening(model, signed.transcripts[i], c)
    return c, container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)


def test_shapes_that_do_not_divide_are_refused(tp_tiny):
    cfg = tp_tiny[2].cfg
    for size, what in ((5, "attention heads"), (4, "K/V heads"), (9, "attention heads")):
        with pytest.raises(ShapeError, match=what):
            make_plan(cfg, 0, size)
    with pytest.raises(ShapeError, match="intermediate size"):
        make_plan(replace(cfg, intermediate_size=98), 0, 3)
    tiny_vocab = replace(cfg, vocab_size=4)
    with pytest.raises(ShapeError, match="vocabulary"):
        make_plan(tiny_vocab, 0, 3)  # blocks of 2 rows: the third rank would hold none
    p = make_plan(cfg, 2, 3)  # 128 = 43 + 43 + 42: the last block is padded, not refused
    assert (p.vocab_chunk, p.vocab) == (43, (86, 128))


def test_tp1_communicator_is_the_single_process_path(tp_tiny):
    _, _, qm = tp_tiny
    ref, one = ExactModel(qm), TPModel(qm, Comm())
    for params in (GREEDY, SAMPLED):
        a, b = _signed(ref, params, qm), _signed(one, params, qm)
        assert [r.token_ids for r in a.results] == [r.token_ids for r in b.results]
        assert a.receipts == b.receipts
    tr_a, tr_b = {}, {}
    ref.forward([SeqCache()], [PROMPTS[0]], tr_a, all_logits=True)
    one.forward([SeqCache()], [PROMPTS[0]], tr_b, all_logits=True)
    assert tr_a.keys() == tr_b.keys()
    assert all(torch.equal(tr_a[k], tr_b[k]) for k in tr_a)


@pytest.mark.parametrize("tp_tiny, tp", cases({"llama"} | {(f, 2) for f in FAMILIES}, 2, 3),
                         indirect=["tp_tiny"])
def test_tp_receipts_and_openings_are_bit_identical(tp_tiny, tp):
    folder, loaded, qm = tp_tiny
    ref = ExactModel(qm)
    want = {name: _signed(ref, p, qm) for name, p in (("greedy", GREEDY), ("sampled", SAMPLED))}
    key = build_key(qm, None, secret=bytes(range(32)))  # the key of the UNSHARDED model
    eng = start(str(folder), lambda: qm, loaded.cfg, tp, timeout_s=30)
    try:
        for name, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
            got = _signed(eng.model, params, qm)
            assert [r.token_ids for r in got.results] == [r.token_ids for r in want[name].results]
            assert json.dumps(got.receipts) == json.dumps(want[name].receipts), name
        c, data = _opening_bytes(eng.model, got, key)
    finally:
        eng.close()
    assert [p.poll() for p in eng.procs] == []  # close() reaped every follower
    c_ref, data_ref = _opening_bytes(ref, want["sampled"], key)
    assert c == c_ref and data == data_ref  # the TP opening is the unsharded opening, byte for byte
    meta, arrays = container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
    tok = key_tokenizer(key)
    v = verify(key, got.receipts[0], c, meta, arrays, tok, io_binding=tok is not None)
    assert v.accepted, (v.reason, v.detail)


# TP 3 (interpreted Triton) is slow and adds no path TP 2 lacks (TP 3 is covered by the torch
# engine above): -m slow.
# Mixtral's sharded experts on Triton (_TPTritonExperts) compose the Triton experts (equal to
# torch: kernels/test_triton_backend.py) with the torch TP split (above): -m slow.
@pytest.mark.parametrize("tp_tiny, tp", cases({("llama", 2)}, 2, 3), indirect=["tp_tiny"])
def test_tp_triton_backend_gives_the_exact_engine_bytes(tp_tiny, tp):
    """The Triton kernels sharded (interpreted here): the same ids and receipt bytes as the
    unsharded torch engine, sampled, and at TP 2 the same opening bytes."""
    folder, loaded, qm = tp_tiny
    ref = ExactModel(qm)
    want = _signed(ref, SAMPLED, qm)
    eng = start(str(folder), lambda: qm, loaded.cfg, tp, timeout_s=60, backend="triton")
    try:
        assert type(eng.model).__name__ == "TPTritonModel"
        got = _signed(eng.model, SAMPLED, qm)
        if tp == 2:
            key = build_key(qm, None, secret=bytes(range(32)))
            c, data = _opening_bytes(eng.model, got, key)
    finally:
        eng.close()
    assert [r.token_ids for r in got.results] == [r.token_ids for r in want.results]
    assert json.dumps(got.receipts) == json.dumps(want.receipts)
    if tp == 2:
        assert (c, data) == _opening_bytes(ref, want, key)


def test_smollm2_tp3_matches_and_tp2_is_refused(smollm2):
    qm = smollm2.quantized(get_profile("w8a16"))
    with pytest.raises(ShapeError, match="9 attention heads"):
        start("default", lambda: qm, smollm2.cfg, 2)
    ids = [smollm2.tokenizer.encode("The capital of France is")]
    run = lambda m, p: generate_with_receipts(
        m, smollm2.tokenizer, [{"prompt": "x"}], ids, p, 4, (), "n", salts=[b"s" * 16])
    want = [run(ExactModel(qm), p) for p in (GREEDY, SAMPLED)]
    eng = start("default", lambda: qm, smollm2.cfg, 3, timeout_s=60)
    try:
        got = [run(eng.model, p) for p in (GREEDY, SAMPLED)]
    finally:
        eng.close()
    for g, w in zip(got, want):
        assert g.results[0].token_ids == w.results[0].token_ids
        assert g.receipts == w.receipts


# --- a rank dies mid-generation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_tiny(tmp_path_factory, smollm2):
    """A tiny Llama (splits by 3) with SmolLM2's tokenizer, so the CLI can run it fast."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tp_cli"), "llama", overrides={
        **DIVISIBLE, "vocab_size": smollm2.cfg.vocab_size, "max_position_embeddings": 4096})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2.folder / name, folder / name)
    return folder


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
# rank0-killed is the same connection-reset path as follower-killed; follower-hung waits out
# the collective timeout (20 s here): -m slow.
@pytest.mark.parametrize(("victim", "sig"), [(1, signal.SIGKILL),
                                             pytest.param(1, signal.SIGSTOP,
                                                          marks=pytest.mark.slow),
                                             pytest.param(0, signal.SIGKILL,
                                                          marks=pytest.mark.slow)],
                         ids=["follower-killed", "follower-hung", "rank0-killed"])
def test_dead_or_hung_rank_ends_every_rank_with_an_error(cli_tiny, tmp_path, victim, sig):
    """A killed rank is noticed at once (connection reset); a hung one (SIGSTOP) by the collective
    timeout, after which rank 0 reaps it. Either way every process ends, with an error, in
    bounded time, and the store holds nothing."""
    store = tmp_path / "store"
    store.mkdir()  # an existing store: a failed job must add nothing to it
    exe = Path(sys.executable).parent / "commitllm-engine"
    cmd = [str(exe), "generate", "hello", "--model", str(cli_tiny), "--no-chat", "--tp", "3",
           "--max-tokens", "4000", "--store", str(store), "--tp-timeout", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        proc.stdout.read(1)  # rank 0 streams its first token: generation is under way
        followers = {_rank_of(p): p for p in _children(proc.pid)}
        assert sorted(followers) == [1, 2], followers
        os.kill(followers[1] if victim else proc.pid, sig)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=60)  # EOF once every rank closed its stderr
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while any(map(_alive, followers.values())) and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = stderr.decode().splitlines()
    assert elapsed < 60
    assert not any(map(_alive, followers.values()))  # every follower ended ...
    survivors = [r for r in (0, 1, 2) if r != victim]
    for r in survivors:  # ... each with its own one-line message
        assert any(ln.startswith(f"error: rank {r}: ") and "a rank died or timed out" in ln
                   for ln in lines), lines
    assert proc.returncode == (1 if victim else -signal.SIGKILL)
    assert list(store.iterdir()) == []  # no transcript, not even a temp file


def test_cli_refuses_a_degree_that_does_not_divide(smollm2, tmp_path):
    exe = Path(sys.executable).parent / "commitllm-engine"
    res = subprocess.run([str(exe), "generate", "hi", "--tp", "2", "--max-tokens", "1"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: --tp 2: the model's 9 attention")
    assert np.all([not _alive(p) for p in _children(os.getpid())])


@pytest.mark.parametrize("tp_tiny", cases({"llama"}), indirect=True)
def test_bench_tp_runs_and_checks_ids(tp_tiny):
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench` (last: kernels/ must not shadow)
    from bench import tp as bench_tp

    folder = tp_tiny[0]
    args = bench_tp.parse_args(["--new-tokens", "3", "--runs", "1", "--timeout", "30"])
    rows = bench_tp.measure("tiny", str(folder), [1, 2, 5], args)
    assert [r["tp"] for r in rows] == [1, 2, 5]
    assert rows[0]["same_ids_as_tp1"] and rows[1]["same_ids_as_tp1"]
    assert "attention heads" in rows[2]["refused"]
    data = {"settings": {"new_tokens": 3, "runs": 1, "batch": 1, "profile": "w8a16",
                         "backend": "gloo (CPU)"},
            "load_average_1_5_15": {"before": None, "after": None}, "results": rows,
            "elapsed_s": 1.0, "provenance": bench_tp.provenance()}
    md = bench_tp.render_md(data)
    assert "| tiny | 2 |" in md and "refused" in md


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_launch_gives_the_single_process_receipt(cli_tiny, tmp_path):
    bin_dir = Path(sys.executable).parent
    gen = [str(bin_dir / "commitllm-engine"), "generate", "hello", "--model", str(cli_tiny),
           "--no-chat", "--max-tokens", "5", "--nonce", "n0", "--json"]
    one = subprocess.run([*gen, "--receipt", str(tmp_path / "one.json")], check=False,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    run = subprocess.run([str(bin_dir / "torchrun"), "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), *gen, "--tp", "2",
                          "--receipt", str(tmp_path / "tp2.json")],
                         check=False, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == json.loads(one.stdout)["token_ids"]
    assert (tmp_path / "tp2.json").read_bytes() == (tmp_path / "one.json").read_bytes()


@pytest.mark.slow  # `open --tp 2` around the API path the bit-identical test checks
def test_cli_open_tp2_gives_the_single_process_opening(cli_tiny, tmp_path):
    """`generate --tp 2 --store` then `open --tp 2`: the opening is byte for byte the one a single
    process re-executes, and it verifies with the key of the unsharded model."""
    bin_dir = Path(sys.executable).parent
    eng, ver = str(bin_dir / "commitllm-engine"), str(bin_dir / "commitllm")

    def run(*args):
        res = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr
        return res

    run(eng, "generate", "hello there", "--model", str(cli_tiny), "--no-chat", "--max-tokens", "5",
        "--temperature", "0.9", "--seed", "3", "--tp", "2", "--store", str(tmp_path / "st"),
        "--receipt", str(tmp_path / "r.json"))
    run(ver, "keygen", "--model", str(cli_tiny), "--out", str(tmp_path / "key"))
    run(ver, "challenge", "--key", str(tmp_path / "key"), "--receipt", str(tmp_path / "r.json"),
        "--tier", "full", "--out", str(tmp_path / "c.json"))
    for tp in (1, 2):
        run(eng, "open", "--store", str(tmp_path / "st"), "--challenge", str(tmp_path / "c.json"),
            "--out", str(tmp_path / f"o{tp}.bin"), "--tp", str(tp))
    assert (tmp_path / "o2.bin").read_bytes() == (tmp_path / "o1.bin").read_bytes()
    res = run(ver, "verify", "--key", str(tmp_path / "key"), "--receipt", str(tmp_path / "r.json"),
              "--challenge", str(tmp_path / "c.json"), "--opening", str(tmp_path / "o2.bin"))
    assert "ACCEPTED" in res.stdout


@pytest.mark.slow  # the Triton TP 2 bytes are checked above (API); this adds the CLI around it
def test_cli_tp2_triton_backend_gives_the_exact_receipt(cli_tiny, tmp_path):
    """`generate --backend triton --tp 2` (interpreted kernels here): the receipt file is byte for
    byte the one of the unsharded exact engine."""
    exe = str(Path(sys.executable).parent / "commitllm-engine")
    gen = [exe, "generate", "hello", "--model", str(cli_tiny), "--no-chat", "--max-tokens", "4",
           "--nonce", "n0", "--json"]
    one = subprocess.run([*gen, "--receipt", str(tmp_path / "one.json")], check=False,
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr
    tp2 = subprocess.run([*gen, "--receipt", str(tmp_path / "tp2.json"), "--backend", "triton",
                          "--tp", "2"], check=False, capture_output=True, text=True, timeout=300)
    assert tp2.returncode == 0, tp2.stderr
    assert "tensor-parallel over 2 ranks" in tp2.stderr
    assert (tmp_path / "tp2.json").read_bytes() == (tmp_path / "one.json").read_bytes()

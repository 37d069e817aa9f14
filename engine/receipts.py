"""Generation with receipts, openings from the store, and the one-command audit demo."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..keys.keygen import KEY_VERSION, Key, build_key, key_tokenizer, load_key, save_key
from ..verifier import challenge as challenge_mod
from ..verifier import container
from ..verifier.numerics.sampler import SamplingParams
from ..verifier.outputs import OutputPolicy, StopScan
from ..verifier.opening import OPENING_MAGIC, OPENING_VERSION
from ..verifier.verify import Verdict, verify
from .commit import Committer, make_receipt, trace_roots
from .exact.model import ExactModel, SeqCache
from .generate import Recorder, generate_exact
from .loader import cache_dir
from .open import build_opening


@dataclass
class Signed:
    """Results of a generation with receipts, and what committing cost."""

    results: list
    receipts: list[dict]
    transcripts: list[dict]
    gen_seconds: float
    commit_seconds: float


@dataclass
class SeqRequest:
    """One sequence of a signed batch: what the client asked and how it is decoded."""

    request: dict  # bound into the receipt: {"prompt": ...} (plain) or {"messages": [...]} (the
    prompt_ids: list[int]  # chat template): the verifier re-derives prompt_ids from its shape
    params: SamplingParams
    max_tokens: int
    nonce: str
    salt: bytes | None = None  # random when None (tests inject one to compare receipts)
    output: OutputPolicy = OutputPolicy()  # stop strings / token ids, logprobs, echo


def generate_with_receipts(model: ExactModel, tokenizer, requests: list[dict],
                           prompts: list[list[int]], params: SamplingParams, max_tokens: int,
                           eos_ids, nonce: str, on_token=None, prefill_chunk: int = 0,
                           salts: list[bytes] | None = None) -> Signed:
    """salts: one 16-byte salt per prompt (default: random); fixed salts make receipts
    reproducible byte for byte (tests comparing runs)."""
    if salts is not None and len(salts) != len(prompts):
        raise ValueError(f"{len(salts)} salts for {len(prompts)} prompts")
    seqs = [SeqRequest(r, p, params, max_tokens, nonce, None if salts is None else salts[i])
            for i, (r, p) in enumerate(zip(requests, prompts))]
    return sign_batch(model, tokenizer, seqs, eos_ids, on_token, prefill_chunk)


def sign_batch(model: ExactModel, tokenizer, seqs: list[SeqRequest], eos_ids, on_token=None,
               prefill_chunk: int = 0, cancelled=None) -> Signed:
    """Generate every sequence in one batch, each with its own decode settings, and sign each.
    cancelled(i) (see generate_exact): a cancelled sequence's receipt and transcript are None."""
    if any(s.max_tokens < 1 for s in seqs):
        raise ValueError("a receipt needs at least one generated token (max_tokens >= 1)")
    rec, caches = Recorder(len(seqs)), [SeqCache() for _ in seqs]
    com = Committer(model, tokenizer)
    _ = com.model_commitment, com._hashes  # once per loaded model, like loading
    t0 = time.perf_counter()
    params = [replace(s.params, nonce=s.nonce) for s in seqs]  # the client's nonce in every draw
    if tokenizer is None and any(s.output.stop for s in seqs):
        raise ValueError("stop strings need the model's tokenizer")
    stops = [StopScan(tokenizer, s.output, eos_ids, s.max_tokens) if tokenizer is not None
             else None for s in seqs]
    results = generate_exact(model, [s.prompt_ids for s in seqs], params,
                             [s.max_tokens for s in seqs], eos_ids, on_token, prefill_chunk,
                             recorder=rec, caches=caches, cancelled=cancelled, stops=stops,
                             logprobs=[(s.output.logprobs, s.output.prompt_logprobs)
                                       for s in seqs])
    t1 = time.perf_counter()
    receipts, transcripts = [], []
    for i, (s, res) in enumerate(zip(seqs, results)):
        tr = None if res.finish_reason == "cancelled" else sign_one(
            com, model, s, res, rec.residuals(i, model.cfg.num_layers), caches[i], eos_ids)
        receipts.append(None if tr is None else tr["receipt"])
        transcripts.append(tr)
    return Signed(results, receipts, transcripts, t1 - t0, time.perf_counter() - t1)


def sign_one(com: Committer, model: ExactModel, s: SeqRequest, res, resid, cache: SeqCache,
             eos_ids, resid_leaves=None) -> dict:
    """The transcript {receipt, seed, salt} of one finished sequence: resid fp32 [L+1, T, H] (or
    its leaves [L+1][T]) and its cache are what its generation recorded."""
    salt = os.urandom(16) if s.salt is None else s.salt
    trees = trace_roots(resid, model.full_cache(cache), resid_leaves)
    r = make_receipt(com, s.request, s.nonce, s.params, salt, s.max_tokens, eos_ids,
                     res.prompt_token_ids, res.token_ids, trees, s.output, res.text,
                     _logprobs(res))
    return {"receipt": r, "seed": s.params.seed, "salt": salt.hex()}


def _logprobs(res) -> dict | None:
    if res.logprobs is None:
        return None
    return {"prompt": res.prompt_logprobs, "output": res.logprobs}


def receipt_for_tokens(model: ExactModel, tokenizer, request: dict, nonce: str,
                       params: SamplingParams, salt: bytes, max_tokens: int, eos_ids,
                       prompt_ids: list[int], output_ids: list[int],
                       output: OutputPolicy = OutputPolicy(), text: str | None = None,
                       logprobs: dict | None = None) -> dict:
    """A receipt for a given token sequence, by re-executing it (what a provider that chose the
    tokens some other way would send). Used by tests and the adversary suite. text / logprobs:
    what to commit (default: the whole detokenization; logprobs computed honestly when the
    policy asks for them)."""
    tokens = list(prompt_ids) + list(output_ids)
    rec, cache = Recorder(1), SeqCache()
    want = output.logprobs is not None and logprobs is None
    out = rec.step(model, [0], [cache], [tokens[:-1]], all_logits=want)
    if want:
        from ..verifier.numerics.logprobs import entry

        rows, p = out[0].numpy(), len(prompt_ids)
        logprobs = {"prompt": [entry(rows[t], tokens[t + 1], output.logprobs)
                               for t in range(p - 1)] if output.prompt_logprobs else None,
                    "output": [entry(rows[t], tokens[t + 1], output.logprobs)
                               for t in range(p - 1, len(tokens) - 1)]}
    trees = trace_roots(rec.residuals(0, model.cfg.num_layers), model.full_cache(cache))
    return make_receipt(Committer(model, tokenizer), request, nonce, params, salt,
                        max_tokens, eos_ids, prompt_ids, output_ids, trees, output, text,
                        logprobs)


def open_from_store(model: ExactModel, store, challenge: dict):
    """(meta, arrays) of the opening answering `challenge`."""
    transcript = store.get(str(challenge.get("receipt_id")))
    return build_opening(model, transcript, challenge)


def write_opening(path: Path, meta: dict, arrays: dict) -> int:
    container.write(Path(path), OPENING_MAGIC, OPENING_VERSION, meta, arrays)
    return Path(path).stat().st_size


def cached_key(qm, tokenizer, on_build=None) -> Key:
    """The demo's key, built once per model and kept (mode 0600) in the cache. on_build() is
    called before a key is built (not found in the cache)."""
    from ..verifier.commitment import commit_model

    from ..keys.keygen import numerics_digest

    com = commit_model(qm)["commitment"].hex()
    spec = numerics_digest()[:12]  # a key made under another spec would not verify: rebuilt
    path = cache_dir() / "keys" / f"{com[:32]}-{qm.profile.name}-v{KEY_VERSION}-{spec}.key"
    if path.is_file():
        try:
            return load_key(path)
        except container.ContainerError:
            path.unlink(missing_ok=True)  # stale or damaged: rebuilt below, never trusted
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if on_build is not None:
        on_build()
    key = build_key(qm, tokenizer)
    save_key(key, path)
    return key


def audit(model: ExactModel, key: Key, signed: Signed, tier: str = "full",
          positions="generated") -> list[tuple[Verdict, dict]]:
    """Challenge, open and verify every receipt; returns (verdict, figures) per receipt."""
    tok = key_tokenizer(key)
    out = []
    for r, tr in zip(signed.receipts, signed.transcripts):
        c = challenge_mod.derive(key.secret, r, tier, positions=positions)
        t0 = time.perf_counter()
        meta, arrays = build_opening(model, tr, c)
        t_open = time.perf_counter() - t0
        data = container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)
        m2, a2 = container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
        v = verify(key, r, c, m2, a2, tok, io_binding=tok is not None)  # unchecked: said so
        n = max(len(c["positions"]), 1)
        out.append((v, {"receipt_bytes": len(json.dumps(r)), "opening_bytes": len(data),
                        "challenged_positions": len(c["positions"]),
                        "opening_bytes_per_position": len(data) // n, "open_seconds": t_open,
                        "verify_ms_per_position": {k: v_ * 1e3 / n for k, v_ in v.timing.items()}}))
    return out

"""Openings by exact re-execution: re-run the committed transcript, check that it reproduces the
receipt's roots, and reveal what the challenge asks for. Nothing per token was retained."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from ..verifier.commitment import embed_leaves
from ..verifier.merkle import MerkleTree, multiproof
from ..verifier.opening import Plan, matrices, pack_accumulators, plan
from .commit import trace_roots
from .exact.model import ExactModel, SeqCache

CHUNK = 128  # prefill chunk of the re-execution (values do not depend on it)


class OpenError(Exception):
    """The provider cannot open: unknown receipt, or its re-run does not match its receipt."""


def _proof_array(hashes: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, 32).copy()


def reexecute(model: ExactModel, tokens: list[int], p: Plan, guard=nullcontext):
    """One pass over tokens; returns (cache, residuals [L+1, T, H], z rows by (name, layer)).
    guard(): a context held around each chunk's forward (a server's model lock, so generation
    steps run between the chunks of an opening)."""
    cache, resid, z = SeqCache(), [], {}
    want = {l: set(p.z.get(l, [])) | set(p.zq.get(l, [])) for l in range(model.cfg.num_layers)}
    for start in range(0, len(tokens), CHUNK):
        chunk, tr, rs = tokens[start:start + CHUNK], {}, []
        with guard():
            model.forward([cache], [chunk], tr, residuals=rs, trace_attention=False)
        resid.append(torch.stack(rs).cpu().numpy())  # a device model's rows
        for l, positions in want.items():
            rows = [t - start for t in sorted(positions) if start <= t < start + len(chunk)]
            for m in matrices(model.cfg):
                part = tr[f"layers.{l}.{m}.z"].cpu().numpy()[rows]
                z.setdefault((m, l), []).append(part)
    z = {k: np.concatenate(v) for k, v in z.items()}
    return cache, np.concatenate(resid, axis=1), z


def lm_accumulators(model: ExactModel, final_rows: np.ndarray) -> np.ndarray:
    """LM-head integer accumulators for final residual rows [n, H] (per-row ops: same bits)."""
    return model.lm_accumulators(torch.from_numpy(np.ascontiguousarray(final_rows))).numpy()


def build_opening(model: ExactModel, transcript: dict, challenge: dict, embed_tree=None,
                  guard=nullcontext):
    """(meta, arrays) for the container, accumulators packed (opening version 2); raises OpenError
    if the re-run differs from the receipt.
    guard(): held around each use of the model (see reexecute)."""
    receipt = transcript["receipt"]
    tokens = receipt["prompt_token_ids"] + receipt["output_token_ids"]
    L = model.cfg.num_layers
    p = plan(challenge, L, receipt, window=model.cfg.sliding_window)  # shape checked first
    with torch.inference_mode():
        cache, resid, z = reexecute(model, tokens[:-1], p, guard)
    with guard():
        cache = model.full_cache(cache)
        lm = lm_accumulators(model, resid[L][p.lm]) if p.lm else None  # before any early exit:
    trees = trace_roots(resid, cache)  # a sharded model's ranks all take part in both
    if (trees.resid_root.hex(), trees.kv_root.hex()) != (receipt["trace"]["residual_root"],
                                                         receipt["trace"]["kv_root"]):
        raise OpenError("re-execution does not reproduce the receipt's trace roots; refusing to open")
    arrays = {"resid.layer_roots": _proof_array(trees.resid_layer_roots),
              "kv.layer_roots": _proof_array(trees.kv_layer_roots)}
    _put_resid(arrays, trees, resid, p)
    _put_kv(arrays, trees, cache, p)
    _put_z(arrays, z, p, matrices(model.cfg))
    if p.lm:
        arrays["z.lm.pos"] = np.array(p.lm, dtype=np.int64)
        arrays["z.lm"] = lm
    _put_embed(arrays, model, [tokens[t] for t in p.embed], embed_tree)
    meta = {"receipt_id": receipt["receipt_id"], "challenge_mac": challenge["mac"]}
    if receipt["manifest"]["seed_commitment"] is not None:
        meta.update(seed=transcript["seed"], salt=transcript["salt"])
    return meta, pack_accumulators(arrays, model.cfg, model.profile)  # opening version 2


def _put_resid(arrays, trees, resid, p: Plan) -> None:
    for l, pos in p.resid.items():
        arrays[f"resid.{l}.pos"] = np.array(pos, dtype=np.int64)
        arrays[f"resid.{l}.rows"] = np.ascontiguousarray(resid[l][pos])
        arrays[f"resid.{l}.proof"] = _proof_array(multiproof(trees.resid_trees[l], pos))


def _put_kv(arrays, trees, cache: SeqCache, p: Plan) -> None:
    for l, pos in p.kv.items():
        arrays[f"kv.{l}.pos"] = np.array(pos, dtype=np.int64)
        for name, store in (("k", cache.k), ("sk", cache.sk), ("v", cache.v), ("sv", cache.sv)):
            arrays[f"kv.{l}.{name}"] = np.ascontiguousarray(store[l].cpu().numpy()[pos])
        arrays[f"kv.{l}.proof"] = _proof_array(multiproof(trees.kv_trees[l], pos))


def _put_z(arrays, z, p: Plan, names) -> None:
    for l, pos in p.z.items():
        both = sorted(set(pos) | set(p.zq.get(l, [])))
        idx = [both.index(t) for t in pos]
        arrays[f"z.{l}.pos"] = np.array(pos, dtype=np.int64)
        for m in names:
            arrays[f"z.{l}.{m}"] = z[(m, l)][idx]
        if p.zq.get(l):
            qidx = [both.index(t) for t in p.zq[l]]
            arrays[f"zq.{l}.pos"] = np.array(p.zq[l], dtype=np.int64)
            arrays[f"zq.{l}.qkv"] = z[("qkv", l)][qidx]


def _put_embed(arrays, model: ExactModel, ids: list[int], embed_tree) -> None:
    ids = sorted(set(ids))
    tree = embed_tree or MerkleTree(embed_leaves(model.qm))
    arrays["embed.ids"] = np.array(ids, dtype=np.int64)
    arrays["embed.q"] = np.ascontiguousarray(model.qm.embed.q[ids])
    arrays["embed.s"] = np.ascontiguousarray(model.qm.embed.s[ids])
    arrays["embed.proof"] = _proof_array(multiproof(tree, ids))

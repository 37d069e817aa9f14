"""Receipts at generation time: the manifest, the trace roots, and the transcript store."""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import numpy as np

from ..keys.keygen import numerics_digest
from ..verifier.atomic import atomic_write
from ..verifier.commitment import TraceTrees, commit_model
from ..verifier.numerics import SPEC_VERSION
from ..verifier.numerics.sampler import SamplingParams
from ..verifier.outputs import OutputPolicy
from ..verifier.receipt import build_receipt, seed_commitment
from .exact.model import ExactModel, SeqCache


class Committer:
    """Everything a receipt names about the model and its numerics, computed once per model."""

    def __init__(self, model: ExactModel, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @property
    def model_commitment(self) -> str:
        """Computed once per loaded model (0.4 s on SmolLM2), then kept on the model object."""
        com = getattr(self.model, "_commitment_hex", None)
        if com is None:
            com = commit_model(self.model.qm)["commitment"].hex()
            self.model._commitment_hex = com
        return com

    @cached_property
    def _hashes(self) -> tuple:
        tok = self.tokenizer
        if tok is None:
            return None, None
        cached = getattr(tok, "_commitllm_hashes", None)
        if cached is None:
            cached = (tok.tokenizer_hash(), tok.chat_template_hash())
            tok._commitllm_hashes = cached
        return cached

    def manifest(self, params: SamplingParams, seed_com: str | None, max_tokens: int,
                 eos_ids: tuple[int, ...], output: OutputPolicy = OutputPolicy()) -> dict:
        cfg = self.model.cfg
        return {
            "spec_version": SPEC_VERSION, "numerics_digest": numerics_digest(),
            "profile": self.model.profile.manifest(), "model_commitment": self.model_commitment,
            "rope_digest": self.model.rope.digest(),
            "tokenizer_hash": self._hashes[0], "chat_template_hash": self._hashes[1],
            "sampling": params.manifest(), "seed_commitment": seed_com,
            "limits": {"max_tokens": max_tokens, "eos_token_ids": list(eos_ids),
                       "context_length": cfg.max_position_embeddings},
            "output": output.manifest(),
            "attention": {"window": cfg.sliding_window},
        }


def trace_roots(resid: np.ndarray | None, cache: SeqCache, resid_leaves=None) -> TraceTrees:
    """Trees over a sequence's residuals [L+1, T, H] (or their leaves [L+1][T]) and the K/V
    rows of its cache."""
    stack = lambda xs: np.stack([x.cpu().numpy() for x in xs])  # noqa: E731  [L, T, ...]
    return TraceTrees(resid, stack(cache.k), stack(cache.sk), stack(cache.v), stack(cache.sv),
                      resid_leaves)


def make_receipt(committer: Committer, request: dict, nonce: str, params: SamplingParams,
                 salt: bytes, max_tokens: int, eos_ids, prompt_ids, output_ids,
                 trees: TraceTrees, output: OutputPolicy = OutputPolicy(),
                 text: str | None = None, logprobs: dict | None = None) -> dict:
    """text: what the client is returned (stop strings cut: verifier/outputs.StopScan); None:
    the detokenized output. logprobs: the canonical entries, when the output policy asks."""
    seed_com = None if params.greedy else seed_commitment(params.seed, salt)
    manifest = committer.manifest(params, seed_com, max_tokens, eos_ids, output)
    if text is None:
        text = committer.tokenizer.decode(output_ids) if committer.tokenizer else ""
    trace = {"positions": len(prompt_ids) + len(output_ids) - 1,
             "layers": committer.model.cfg.num_layers,
             "residual_root": trees.resid_root.hex(), "kv_root": trees.kv_root.hex()}
    return build_receipt(manifest, request, nonce, prompt_ids, output_ids, text, trace, logprobs)


# --- transcript store ---------------------------------------------------------------------------

_ID = re.compile(r"^[0-9a-f]{64}$")


class TranscriptStore:
    """DIR/<receipt_id>.json: the receipt plus what re-execution needs (seed and salt).
    Nothing per token beyond the token ids is kept."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # the provider's transcripts

    def put(self, receipt: dict, seed: int, salt: bytes, extra: dict | None = None) -> Path:
        """Store atomically (temp file, fsync, rename). extra: e.g. the model argument."""
        path = self.root / f"{receipt['receipt_id']}.json"
        data = json.dumps({"receipt": receipt, "seed": seed, "salt": salt.hex(), **(extra or {})})
        return atomic_write(path, data, mode=0o600, fsync=True)  # the provider's record

    def get(self, receipt_id: str) -> dict:
        if not _ID.match(receipt_id):
            raise KeyError(f"malformed receipt id {receipt_id!r}")
        path = self.root / f"{receipt_id}.json"
        if not path.is_file():
            raise KeyError(f"no transcript for receipt {receipt_id} in {self.root}")
        return json.loads(path.read_text())

"""Glue between the command line and the library: load, tokenize, generate, format results."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..verifier.checkpoint import CheckpointError
from ..verifier.config import ConfigError
from ..verifier.numerics import SPEC_VERSION, get_profile
from ..verifier.numerics.sampler import SamplingParams
from .loader import LoadedModel, ModelNotFound, load_model
from ..verifier.tokenizer import TokenizerError


class EngineError(Exception):
    """A user-facing failure: bad model, bad input, bad option. The message is one line."""


LOAD_ERRORS = (ModelNotFound, CheckpointError, ConfigError, TokenizerError, OSError, ValueError)


@dataclass
class Runner:
    loaded: LoadedModel
    backend: str
    profile_name: str
    model: object  # ExactModel, TPModel (rank 0 of a tensor-parallel job) or ReferenceModel
    console: Console
    tp: object = None  # the TPEngine when --tp > 1 (or under torchrun)

    @classmethod
    def create(cls, model: str, backend: str, profile: str, console: Console, tp: int = 1,
               tp_timeout: float = 60.0) -> "Runner":
        from .tp.comm import TPError
        from .tp.launch import env_rank

        sharded = tp > 1 or env_rank() is not None
        if sharded and backend not in ("exact", "triton"):
            raise EngineError("--tp needs --backend exact or triton (the fp32 reference path is "
                              "not sharded)")
        try:
            prof = get_profile(profile)
            with console.status(f"loading {model} ..."):
                loaded = load_model(model)
                engine = (_build_tp(model, loaded, prof, tp, tp_timeout, backend) if sharded else
                          _build(loaded, backend, prof))
        except (*LOAD_ERRORS, TPError) as e:
            raise EngineError(str(e)) from None
        note = (f"exact engine, {backend} backend ({SPEC_VERSION}, profile {profile})"
                if backend in ("exact", "triton") else
                "fp32 reference path: NOT the exact engine, not verifiable")
        if sharded:
            note += f", tensor-parallel over {engine.size} ranks (gloo)"
        console.print(f"model {loaded.folder} | {note}", highlight=False)
        if sharded:
            return cls(loaded, backend, profile, engine.model, console, engine)
        return cls(loaded, backend, profile, engine, console)

    def close(self, failed: bool = False) -> None:
        """Stop the tensor-parallel ranks (after a failure: leave the group so they fail fast)."""
        if self.tp is not None:
            self.tp.abort() if failed else self.tp.close()
            self.tp = None

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def sampling(self, temperature: float, top_k: int, top_p: float, seed: int) -> SamplingParams:
        try:
            return SamplingParams(temperature, top_k, top_p, seed)
        except ValueError as e:
            raise EngineError(str(e)) from None

    def encode_prompts(self, texts: list[str], chat: bool | None) -> list[list[int]]:
        use_chat = self.tokenizer.chat_template is not None if chat is None else chat
        self._chat = use_chat
        if use_chat and self.tokenizer.chat_template is None:
            raise EngineError("this model has no chat template; use --no-chat")
        if use_chat:
            return [self.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
        return [self.tokenizer.encode(t) for t in texts]

    def eos_ids(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.loaded.cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)))

    def streamer(self, out):
        """A callback that prints each token's new text as it is generated."""
        from .generate import TextDeltas

        deltas = TextDeltas(self.tokenizer)

        def on_token(_i: int, t: int) -> None:
            if delta := deltas.push(t):
                out.write(delta)
                out.flush()
        return on_token

    def generate(self, prompts, params, max_tokens, prefill_chunk=0, on_token=None, progress=True):
        from .generate import generate_exact, generate_reference

        with _progress(self.console, progress, len(prompts) * max_tokens) as bar:
            cb = on_token or bar
            try:
                if self.backend in ("exact", "triton"):
                    return generate_exact(self.model, prompts, params, max_tokens, self.eos_ids(),
                                          cb, prefill_chunk)
                return generate_reference(self.model, prompts, params, max_tokens, self.eos_ids(), cb)
            except ValueError as e:
                raise EngineError(str(e)) from None

    def generate_signed(self, texts, prompts, params, max_tokens, prefill_chunk, on_token, nonce):
        from .receipts import generate_with_receipts

        # the request's shape says how its prompt was encoded (the verifier re-derives the ids)
        requests = [{"messages": [{"role": "user", "content": t}]} if self._chat else {"prompt": t}
                    for t in texts]
        try:
            return generate_with_receipts(self.model, self.tokenizer, requests, prompts, params,
                                          max_tokens, self.eos_ids(), nonce, on_token, prefill_chunk)
        except ValueError as e:
            raise EngineError(str(e)) from None

    def results_json(self, texts, results, params: SamplingParams, elapsed: float) -> dict:
        return {
            "model": str(self.loaded.folder), "backend": self.backend,
            "profile": self.profile_name if self.backend != "reference-fp32" else None,
            "spec_version": SPEC_VERSION if self.backend != "reference-fp32" else None,
            "sampling": params.manifest() | {"seed": params.seed},
            "elapsed_s": round(elapsed, 4),
            "results": [{"prompt": t, "prompt_token_ids": r.prompt_token_ids,
                         "token_ids": r.token_ids, "text": self.tokenizer.decode(r.token_ids),
                         "finish_reason": r.finish_reason} for t, r in zip(texts, results)],
        }

    def summary(self, results, elapsed: float) -> str:
        n = sum(len(r.token_ids) for r in results)
        rate = n / elapsed if elapsed > 0 else float("inf")
        return f"{n} tokens in {elapsed:.2f} s ({rate:.1f} tokens/s, {self.backend})"

    def score(self, text: str, max_tokens: int) -> dict:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        limit = self.loaded.cfg.max_position_embeddings
        ids = ids[:max_tokens or limit][:limit]
        if len(ids) < 2:
            raise EngineError("the text has fewer than 2 tokens; nothing to score")
        with self.console.status(f"scoring {len(ids)} tokens ..."):
            if self.backend in ("exact", "triton"):
                from .generate import teacher_forced_scores

                top, lp = teacher_forced_scores(self.model, ids)
                return score_result(ids, top, lp)
            return score_logits(ids, self.model.forward([ids])[0].numpy())


def score_logits(ids: list[int], logits: np.ndarray) -> dict:
    """argmax per position and log-probabilities (float64 log-softmax) of the actual next token."""
    from .generate import next_logprobs

    return score_result(ids, np.argmax(logits, -1), next_logprobs(logits[:-1], ids[1:]))


def score_result(ids: list[int], top: np.ndarray, lp: np.ndarray) -> dict:
    nll = float(-lp.sum())
    return {"token_ids": ids, "argmax": top.tolist(), "logprobs": lp.tolist(),
            "nll": nll, "perplexity": math.exp(nll / len(lp))}


def _build_tp(model_arg: str, loaded: LoadedModel, prof, tp: int, timeout_s: float,
              backend: str = "exact"):
    from .tp.launch import start

    return start(model_arg, lambda: loaded.quantized(prof), loaded.cfg, tp, timeout_s, prof.name,
                 backend)


def _build(loaded: LoadedModel, backend: str, prof):
    if backend == "exact":
        from .exact.model import ExactModel

        return ExactModel(loaded.quantized(prof))
    if backend == "triton":
        import os

        import torch

        if not torch.cuda.is_available():  # run the kernels on the CPU through the interpreter
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from .exact.triton_backend import TritonModel

        return TritonModel(loaded.quantized(prof))
    if backend == "reference-fp32":
        from .reference import ReferenceModel

        return ReferenceModel(loaded.cfg, loaded.tensors)
    raise EngineError(f"unknown backend {backend!r}")


class _progress:
    """A rich progress bar over generated tokens (a no-op when disabled or when streaming)."""

    def __init__(self, console: Console, enabled: bool, total: int):
        self.enabled, self.total = enabled and total > 0, total
        self.bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)

    def __enter__(self):
        if not self.enabled:
            return None
        self.bar.start()
        task = self.bar.add_task("gen", total=self.total)
        return lambda _i, _t: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()

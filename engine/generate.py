"""Batched generation on the exact engine (or the fp32 reference, for comparison)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..verifier.numerics import logprobs as lp_mod
from ..verifier.numerics.sampler import SamplingParams, sample
from ..verifier.outputs import StopScan
from .exact.model import ExactModel, SeqCache
from .exact.paged import KVPool, PagedCache
from .reference import ReferenceModel


@dataclass
class Result:
    """One sequence's outcome. finish_reason is 'eos', 'length', 'stop' (a stop string or stop
    token id, under a StopScan) or 'cancelled' (stopped early at the caller's request: a
    cancelled sequence is unfinished and gets no receipt). logprobs / prompt_logprobs: the
    canonical entries (verifier/numerics/logprobs.entry) when asked for."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    text: str | None = None  # the text to return (stop strings cut), under a StopScan


OnToken = Callable[[int, int], None]  # (sequence index, token id)


class TextDeltas:
    """One sequence's text as its tokens arrive (CLI streaming, server SSE): push(token) gives the
    new text, "" while a UTF-8 character is incomplete or when the decoded prefix is not a prefix
    of what was already shown; rest(final) is what the final text adds to what was shown.
    stop: the stop strings; the last (longest - 1) characters are kept back until more text
    arrives, and text from a stop string on is never sent (it is not returned)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.ids, self.shown, self.stop = tokenizer, [], "", stop
        self.holdback = max(map(len, stop), default=1) - 1

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:  # the stop rule ends here: the text before the first stop string, no more
            text = text[:min(hits)]
        elif text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        elif self.holdback:
            text = text[:len(text) - self.holdback]
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta

    def rest(self, final: str) -> str:
        return final[len(self.shown):] if final.startswith(self.shown) else ""


def per_seq(x, n: int) -> list:
    """One value per sequence: a list of n is kept, a single value is repeated."""
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{len(x)} per-sequence values for {n} sequences")
        return list(x)
    return [x] * n


def check_request(prompts: list[list[int]], max_tokens, vocab_size: int, max_len: int) -> None:
    """Refuse empty prompts, out-of-vocabulary ids and requests beyond the context length.
    max_tokens: one limit for every prompt, or a list with one per prompt."""
    for i, (p, mt) in enumerate(zip(prompts, per_seq(max_tokens, len(prompts)))):
        if mt < 0:
            raise ValueError(f"max_tokens must be >= 0, got {mt}")
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has a token id outside [0, {vocab_size})")
        if len(p) + mt > max_len:
            raise ValueError(f"prompt {i}: {len(p)} tokens + {mt} new exceed the context "
                             f"length {max_len}")


class Recorder:
    """Collects, per sequence, what the receipt commits: residual rows of every layer."""

    def __init__(self, n_seqs: int):
        self.rows: list[list[list[torch.Tensor]]] = [[] for _ in range(n_seqs)]

    def step(self, model: ExactModel, seq_ids: list[int], caches, tokens,
             all_logits: bool = False) -> list[torch.Tensor]:
        resid: list[torch.Tensor] = []
        out = model.forward(caches, tokens, residuals=resid, all_logits=all_logits)
        lengths = [len(t) for t in tokens]
        for layer_x in resid:
            for i, part in zip(seq_ids, layer_x.cpu().split(lengths)):
                self.rows[i].append(part)
        return out

    def residuals(self, i: int, n_layers: int):
        """fp32 numpy [L+1, T, H] for sequence i."""
        per_layer = [torch.cat(self.rows[i][l::n_layers + 1]) for l in range(n_layers + 1)]
        return torch.stack(per_layer).numpy()


def generate_exact(model: ExactModel, prompts: list[list[int]], params, max_tokens,
                   eos_ids: tuple[int, ...], on_token: OnToken | None = None,
                   prefill_chunk: int = 0, recorder: Recorder | None = None,
                   caches: list[SeqCache] | None = None,
                   cancelled: Callable[[int], bool] | None = None,
                   stops: list[StopScan | None] | None = None,
                   logprobs: list[tuple[int | None, bool]] | None = None) -> list[Result]:
    """Prefill all prompts in one batch (optionally in chunks), then decode the live ones together.
    params and max_tokens: one for the batch, or a list with one per prompt (a server's batch).
    cancelled(i): checked before each decode step; a true answer drops sequence i from the batch
    (finish_reason 'cancelled'). The others' values do not change: the engine is batch-invariant.
    stops[i]: the stop rule of sequence i (verifier/outputs.StopScan; None: EOS and max_tokens).
    logprobs[i]: (top k or None, prompt logprobs too) for sequence i."""
    check_request(prompts, max_tokens, model.cfg.vocab_size, model.cfg.max_position_embeddings)
    params, max_tokens = per_seq(params, len(prompts)), per_seq(max_tokens, len(prompts))
    stops = per_seq(stops, len(prompts))
    want = per_seq(logprobs, len(prompts)) if logprobs is not None else [(None, False)] * len(
        prompts)
    results = [Result(list(p)) for p in prompts]
    for res, (k, prompt_lp) in zip(results, want):
        if k is not None:
            res.logprobs = []
            res.prompt_logprobs = [] if prompt_lp else None
    caches = default_caches(model, prompts, max_tokens) if caches is None else caches
    if max(max_tokens, default=0) == 0:
        return results
    run = recorder.step if recorder is not None else (
        lambda m, _ids, c, t, all_logits=False: m.forward(c, t, all_logits=all_logits))
    logits = _prefill(model, caches, prompts, prefill_chunk, run, results, want)
    live = [i for i in range(len(prompts)) if max_tokens[i] > 0]
    logits = [logits[i] for i in live]
    while live:
        live = [i for j, i in enumerate(live)
                if pick(logits[j], params[i], results[i], on_token, i, eos_ids, max_tokens[i],
                         stops[i], want[i][0]) is not None]
        if cancelled is not None:
            for i in [i for i in live if cancelled(i)]:
                results[i].finish_reason = "cancelled"
                live.remove(i)
        if live:
            logits = run(model, live, [caches[i] for i in live],
                         [[results[i].token_ids[-1]] for i in live])
    return results


def default_caches(model: ExactModel, prompts: list[list[int]], max_tokens: list[int]) -> list:
    """One SeqCache for a single sequence (or a backend with caches of its own); several
    sequences on the torch backend share one paged pool sized for all they can reach, so a step
    writes and gathers each layer's K/V once instead of once per sequence. The values are the
    same either way (tests/test_batching.py: the paged forward equals SeqCache)."""
    if len(prompts) < 2 or type(model) is not ExactModel:
        return [SeqCache() for _ in prompts]
    need = [len(p) + m for p, m in zip(prompts, max_tokens)]
    cfg, prof = model.cfg, model.profile
    pool = KVPool(cfg, prof, sum(KVPool.bytes_for(cfg, prof, n) for n in need))
    caches = [PagedCache(pool) for _ in prompts]
    for c, n in zip(caches, need):
        if not c.reserve(n):
            raise AssertionError("a pool sized for the batch could not hold it")
    return caches


def _prefill(model: ExactModel, caches, prompts, chunk: int, run, results=None,
             want=None) -> list[torch.Tensor]:
    """The last logits row of every prompt; the prompt logprobs of the sequences that ask for them
    (every row's logits, when one of the batch does: the others' rows are the same either way)."""
    everything = want is not None and any(k is not None and p for k, p in want)
    chunk = chunk if chunk > 0 else max(len(p) for p in prompts)
    last = [None] * len(prompts)
    longest = max(len(p) for p in prompts)
    for start in range(0, longest, chunk):
        idx = [i for i, p in enumerate(prompts) if len(p) > start]
        parts = [prompts[i][start:start + chunk] for i in idx]
        out = run(model, idx, [caches[i] for i in idx], parts, all_logits=everything)
        for i, part, lg in zip(idx, parts, out):
            if everything and results[i].prompt_logprobs is not None:
                prompt_entries(results[i], start, lg, want[i][0])
            last[i] = lg[-1:]
    return last


def prompt_entries(res: Result, start: int, rows: torch.Tensor, top: int, skip: int = 0) -> None:
    """Append the prompt logprobs of a prefill chunk from `start`: row j of its logits predicts
    prompt token start + j + 1 (the last prompt row predicts the first output token: not here).
    skip: entries already made (a recomputed chunk adds none twice)."""
    rows, prompt = rows.numpy(), res.prompt_token_ids
    for j in range(len(rows)):
        t = start + j
        if skip <= t and t + 1 < len(prompt):
            res.prompt_logprobs.append(lp_mod.entry(rows[j], prompt[t + 1], top))


def pick(logits, params, res: Result, on_token, i, eos_ids, max_tokens,
          stop: StopScan | None = None, top: int | None = None) -> int | None:
    """Choose the next token; returns None when the sequence is finished."""
    position = len(res.prompt_token_ids) + len(res.token_ids)
    row = logits.reshape(-1).numpy()
    tok = sample(row, params, position)
    res.token_ids.append(tok)
    if top is not None:
        res.logprobs.append(lp_mod.entry(row, tok, top))
    if on_token is not None:
        on_token(i, tok)
    if stop is not None:
        if stop.push(tok):
            res.finish_reason = stop.finish_reason
            res.text = stop.final_text()
            return None
        return tok
    if tok in eos_ids:
        res.finish_reason = "eos"
        return None
    if len(res.token_ids) >= max_tokens:
        res.finish_reason = "length"
        return None
    return tok


def generate_reference(model: ReferenceModel, prompts: list[list[int]], params: SamplingParams,
                       max_tokens: int, eos_ids: tuple[int, ...],
                       on_token: OnToken | None = None) -> list[Result]:
    """The fp32 float path, one sequence at a time (comparison only; not verifiable)."""
    check_request(prompts, max_tokens, model.cfg.vocab_size, model.cfg.max_position_embeddings)
    results = []
    for i, p in enumerate(prompts):
        res = Result(list(p))
        results.append(res)
        if max_tokens == 0:
            continue
        logits, cache = model.prefill(torch.tensor([p]))
        while pick(logits[0].float(), params, res, on_token, i, eos_ids, max_tokens) is not None:
            logits, cache = model.decode_step(torch.tensor([res.token_ids[-1]]), cache)
    return results


def teacher_forced(model: ExactModel, ids: list[int], chunk: int = 512) -> np.ndarray:
    """Logits fp32 [T, V] of every position of `ids` (prefill in chunks of `chunk`)."""
    cache, out = SeqCache(), []
    for start in range(0, len(ids), chunk):
        out.append(model.forward([cache], [ids[start:start + chunk]], all_logits=True)[0])
    return torch.cat(out).numpy()


def next_logprobs(logits: np.ndarray, next_ids) -> np.ndarray:
    """float64 log-softmax of each row, at the next token: logits fp32 [n, V], next_ids [n]."""
    lg = logits.astype(np.float64)
    top = lg.max(-1)
    lse = np.log(np.sum(np.exp(lg - top[:, None]), -1)) + top
    return lg[np.arange(len(next_ids)), np.asarray(next_ids, dtype=np.int64)] - lse


def teacher_forced_scores(model: ExactModel, ids: list[int],
                          chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """argmax int64 [T] and the next token's log-probability float64 [T - 1] of every position,
    one chunk of logits at a time: memory holds one chunk's [chunk, V], never [T, V]."""
    cache, top, lp = SeqCache(), [], []
    for start in range(0, len(ids), chunk):
        logits = model.forward([cache], [ids[start:start + chunk]], all_logits=True)[0].numpy()
        top.append(logits.argmax(-1))
        nxt = ids[start + 1:start + 1 + len(logits)]
        lp.append(next_logprobs(logits[:len(nxt)], nxt))
    return np.concatenate(top).astype(np.int64), np.concatenate(lp)

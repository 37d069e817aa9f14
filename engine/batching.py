"""Continuous (iteration-level) batching: sequences join the running batch at the next step and
leave it as soon as they finish.

Every step is one forward over a mix of sequences: each decoding sequence feeds its last token,
and prefilling sequences feed chunks of their prompt from what is left of the step's token budget
(shared fairly, see Scheduler.plan), so a long prompt is spread over several steps instead of
stalling every other sequence's next token. The exact engine is batch-invariant and chunk-invariant (every
op is per token except attention, which is per sequence), so what a sequence computes, and so its
receipt, does not depend on which sequences shared its steps or how its prompt was split: the
tests compare receipts byte for byte with the sequence run alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..verifier.commitment import leaf_hashes
from ..verifier.outputs import StopScan
from .commit import Committer
from .exact.model import ExactModel, SeqCache
from .exact.paged import KVPool, PagedCache
from .generate import Result, check_request, pick, prompt_entries
from .prefix import PrefixCache
from .receipts import SeqRequest, sign_one

DEFAULT_TOKEN_BUDGET = 256  # tokens per step: decodes first, then prefill chunks


class Refused(ValueError):
    """A request the scheduler cannot run (the client's to fix: 400, not a server error)."""


@dataclass
class Running:
    """One sequence in the scheduler: its request, cache, what it produced so far."""

    uid: int
    seq: SeqRequest
    on_token: Callable[[int], None] | None
    cancelled: Callable[[], bool]
    result: Result
    cache: object  # SeqCache, or a PagedCache in the scheduler's pool
    stop: StopScan | None = None
    leaves: list | None = None  # [L+1][positions so far]: residual leaf hashes
    hashes: list | None = None  # prefix-cache hashes of its full blocks so far (chained)
    fresh: bool = True  # an empty cache the prefix cache has not been asked about yet

    def context(self) -> list[int]:
        """Every token this sequence feeds: the prompt, then each sampled token (the last one
        sampled is fed by the next step)."""
        return self.seq.prompt_ids + self.result.token_ids

    def context_len(self) -> int:
        return len(self.seq.prompt_ids) + len(self.result.token_ids)

    def feed(self, n: int) -> list[int]:
        """The next n tokens of the context after what the cache holds."""
        at, p = self.cache.length, self.seq.prompt_ids
        if at >= len(p):
            return self.result.token_ids[at - len(p):at - len(p) + n]
        return (p[at:at + n] + self.result.token_ids[:max(0, at + n - len(p))])[:n]

    @property
    def decoding(self) -> bool:
        return bool(self.result.token_ids) and self.cache.length == self.context_len() - 1


@dataclass
class Finished:
    """A sequence that left the batch: its transcript (None when cancelled) or the error."""

    uid: int
    result: Result
    transcript: dict | None = None
    error: Exception | None = None


class Scheduler:
    """The running batch of a serving engine. add() a sequence at any time; step() runs one
    forward over the batch and returns the sequences that finished in it, signed.

    pool: a KVPool; every sequence's K/V rows then live in its blocks (engine/exact/paged.py).
    A step reserves the blocks it will write first; when the pool is short, decodes take blocks
    from the most recently admitted sequences (preempted: their blocks freed, recomputed later,
    which is exact, so their receipts do not change) and prefills wait. prefix: a PrefixCache on
    the same pool (engine/prefix.py)."""

    def __init__(self, model: ExactModel, tokenizer, eos_ids,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, max_seqs: int = 16,
                 pool: KVPool | None = None, prefix: PrefixCache | None = None):
        if token_budget <= max_seqs:
            raise ValueError(f"the token budget per step ({token_budget}) must exceed the most "
                             f"sequences in a step ({max_seqs}): decodes would leave no room "
                             "for prefill")
        if prefix is not None and prefix.pool is not pool:
            raise ValueError("the prefix cache must use the scheduler's K/V pool")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, tuple(eos_ids)
        self.token_budget, self.max_seqs = token_budget, max_seqs
        self.pool, self.prefix = pool, prefix
        self.running: list[Running] = []  # in admission order
        self.committer = Committer(model, tokenizer)
        _ = self.committer.model_commitment, self.committer._hashes
        self._uid = 0
        self.steps = self.step_tokens = self.preemptions = 0
        self.last_work: list[tuple[Running, list[int]]] = []
        self._preempted_now: set[int] = set()  # preempted while planning this step

    def __len__(self) -> int:
        return len(self.running)

    def full(self) -> bool:
        return len(self.running) >= self.max_seqs

    def add(self, seq: SeqRequest, on_token: Callable[[int], None] | None = None,
            cancelled: Callable[[], bool] = lambda: False) -> int:
        """Admit a sequence (Refused for a request the model cannot run); returns its id."""
        if seq.max_tokens < 1:
            raise Refused("a receipt needs at least one generated token (max_tokens >= 1)")
        try:
            check_request([seq.prompt_ids], seq.max_tokens, self.model.cfg.vocab_size,
                          self.model.cfg.max_position_embeddings)
        except ValueError as e:
            raise Refused(str(e)) from None
        if self.tokenizer is None and seq.output.stop:
            raise Refused("stop strings need the model's tokenizer")
        if self.pool is not None:
            need = self.pool.blocks_for(len(seq.prompt_ids) + seq.max_tokens)
            if need > self.pool.n_blocks:
                raise Refused(f"{len(seq.prompt_ids)} prompt + {seq.max_tokens} new tokens "
                              f"need {need} K/V blocks; the whole pool has "
                              f"{self.pool.n_blocks} (serve --kv-cache-mib)")
        res = Result(list(seq.prompt_ids))
        if seq.output.logprobs is not None:
            res.logprobs = []
            res.prompt_logprobs = [] if seq.output.prompt_logprobs else None
        stop = (StopScan(self.tokenizer, seq.output, self.eos_ids, seq.max_tokens)
                if self.tokenizer is not None else None)
        uid, self._uid = self._uid, self._uid + 1
        cache = SeqCache() if self.pool is None else PagedCache(self.pool)
        r = Running(uid, seq, on_token, cancelled, res, cache, stop=stop)
        self._reset(r)
        self.running.append(r)
        return uid

    def _reset(self, r: Running) -> None:
        """An empty cache (new or preempted); the prefix cache is asked when it is next planned."""
        r.leaves = [[] for _ in range(self.model.cfg.num_layers + 1)]
        r.hashes = []
        r.fresh = True

    def _lookup(self, r: Running) -> None:
        r.fresh = False
        if self.prefix is None or r.result.prompt_logprobs is not None or r.cache.length:
            return
        found, r.hashes = self.prefix.match(r.context())
        if found:
            r.cache.attach([c.block for c in found], len(found) * self.pool.block_size)
            for c in found:
                for l, ls in enumerate(c.leaves):
                    r.leaves[l] += ls

    def _preempt(self, r: Running) -> None:
        self._preempted_now.add(r.uid)
        r.cache.free()
        self.preemptions += 1
        self._reset(r)

    def plan(self) -> list[tuple[Running, list[int]]]:
        """This step's (sequence, tokens to feed): every decoding sequence one token, then the
        prefilling ones chunks of their context from what is left of the budget, shared fairly
        (each gets up to an equal share, what a short prompt leaves goes to the others, oldest
        first): a short prompt behind long ones is done in one step, so its first token waits
        about one step, not for the prompts ahead of it. With a pool, the blocks are reserved
        here: a sequence short of blocks preempts the youngest sequences admitted after it that
        are not in this step, or waits."""
        budget, work, taken = self.token_budget, [], set()
        self._preempted_now.clear()
        for r in [r for r in self.running if r.decoding]:
            if r.uid in self._preempted_now:
                continue  # preempted for an older decode: recomputed from its context later
            if self.pool is not None and not self._reserve(r, 1, taken):
                continue
            work.append((r, [r.result.token_ids[-1]]))
            taken.add(r.uid)
            budget -= 1
        prefills = [r for r in self.running if not r.decoding]
        for r in prefills:
            if r.fresh:
                self._lookup(r)
        for r, n in self._shares(prefills, budget):
            if r.uid in self._preempted_now:
                continue  # its cache was just given up: it is planned afresh next step
            if self.pool is not None and not self._reserve(r, n, taken):
                continue
            work.append((r, r.feed(n)))
            taken.add(r.uid)
        if not work and self.running:  # the oldest can always preempt the rest (add() checks)
            raise RuntimeError("no running sequence could be scheduled")
        return work

    @staticmethod
    def _shares(prefills: list[Running], budget: int) -> list[tuple[Running, int]]:
        """Tokens per prefilling sequence (in admission order): rounds of an equal share of what
        is left, each capped at what the sequence still has to feed."""
        want = {r.uid: r.context_len() - r.cache.length for r in prefills}
        grant = dict.fromkeys(want, 0)
        pending = [r for r in prefills if want[r.uid] > 0]
        while budget > 0 and pending:
            share = max(budget // len(pending), 1)
            for r in pending:
                g = min(want[r.uid] - grant[r.uid], share, budget)
                grant[r.uid] += g
                budget -= g
                if budget == 0:
                    break
            pending = [r for r in pending if grant[r.uid] < want[r.uid]]
        return [(r, grant[r.uid]) for r in prefills if grant[r.uid] > 0]

    def _reserve(self, r: Running, n: int, taken: set) -> bool:
        while not r.cache.reserve(n):
            mine = self.running.index(r)
            younger = [v for v in self.running[mine + 1:] if v.uid not in taken and v.cache.blocks]
            if not younger:
                return False  # waits for a step with more room
            self._preempt(younger[-1])
        return True

    def step(self) -> list[Finished]:
        """One forward; the sequences that finished (or were cancelled) in it. An error of the
        forward itself is raised after every running sequence was failed with it."""
        done = [self._leave(r, None) for r in list(self.running) if r.cancelled()]
        work = self.plan()
        self.last_work = work
        if not work:
            return done
        everything = any(not r.decoding and r.result.prompt_logprobs is not None
                         and r.cache.length < len(r.seq.prompt_ids) - 1 for r, _ in work)
        starts = [r.cache.length for r, _ in work]
        resid: list[torch.Tensor] = []
        try:
            out = self.model.forward([r.cache for r, _ in work], [t for _, t in work],
                                     residuals=resid, all_logits=everything)
            self._record(work, starts, resid)
        except Exception as e:
            raise StepError(e, done + self.abort(e)) from e
        self.steps += 1
        self.step_tokens += sum(len(t) for _, t in work)
        for (r, toks), start, logits in zip(work, starts, out):
            res = r.result
            if everything and res.prompt_logprobs is not None:
                prompt_entries(res, start, logits, r.seq.output.logprobs,
                               skip=len(res.prompt_logprobs))
            self._cache_blocks(r, start)
            if r.cache.length < r.context_len():
                continue  # more context to feed
            params = replace(r.seq.params, nonce=r.seq.nonce)
            on_token = None if r.on_token is None else (lambda _i, t, f=r.on_token: f(t))
            tok = pick(logits[-1:], params, res, on_token, r.uid, self.eos_ids,
                       r.seq.max_tokens, r.stop, r.seq.output.logprobs)
            if tok is None:
                done.append(self._finish(r))
        return done

    def _record(self, work, starts, resid: list[torch.Tensor]) -> None:
        """The residual leaves of this step's positions, hashed per layer over the whole step."""
        pos = np.concatenate([np.arange(a, a + len(t)) for a, (_, t) in zip(starts, work)])
        bounds = np.cumsum([0] + [len(t) for _, t in work])
        for l, x in enumerate(resid):
            leaves = leaf_hashes(b"resid", l, pos, [x.cpu().numpy()])
            for i, (r, _) in enumerate(work):
                r.leaves[l] += leaves[bounds[i]:bounds[i + 1]]

    def _cache_blocks(self, r: Running, start: int) -> None:
        """Offer the blocks this step filled to the prefix cache."""
        if self.prefix is None:
            return
        bs = self.pool.block_size
        first, end = start // bs, r.cache.length // bs
        if end <= first:
            return
        if len(r.hashes) < end:  # only the new blocks' tokens are hashed
            r.hashes = self.prefix.hashes(r.context()[:end * bs], end, r.hashes)
        for b in range(first, end):
            leaves = [ls[b * bs:(b + 1) * bs] for ls in r.leaves]
            self.prefix.insert(r.hashes[b], r.cache.blocks[b], leaves)

    def _finish(self, r: Running) -> Finished:
        try:
            tr = sign_one(self.committer, self.model, r.seq, r.result, None, r.cache,
                          self.eos_ids, resid_leaves=r.leaves)
        except Exception as e:  # noqa: BLE001 - this sequence gets the error, not the batch
            return self._leave(r, None, e)
        return self._leave(r, tr)

    def abort(self, error: Exception | None = None) -> list[Finished]:
        """Every running sequence leaves (with the error, or cancelled), its blocks freed."""
        return [self._leave(r, None, error) for r in list(self.running)]

    def _leave(self, r: Running, transcript: dict | None, error: Exception | None = None):
        self.running.remove(r)
        if isinstance(r.cache, PagedCache):
            r.cache.free()
        if transcript is None and error is None:
            r.result.finish_reason = "cancelled"
        return Finished(r.uid, r.result, transcript, error)


class StepError(RuntimeError):
    """The forward of a step failed: every sequence that was running left with the error."""

    def __init__(self, cause: Exception, finished: list[Finished]):
        super().__init__(str(cause))
        self.cause, self.finished = cause, finished


def run_all(model: ExactModel, tokenizer, eos_ids, seqs: list[SeqRequest],
            arrivals: list[int] | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET,
            max_seqs: int = 16, pool: KVPool | None = None,
            prefix: PrefixCache | None = None) -> list[Finished]:
    """Run seqs through a scheduler; arrivals[i]: the step before which sequence i is added
    (default all at once), so tests can stagger them. Results in the order of seqs."""
    arrivals = [0] * len(seqs) if arrivals is None else arrivals
    sched = Scheduler(model, tokenizer, eos_ids, token_budget, max_seqs, pool, prefix)
    uid_of, out, step = {}, {}, 0
    pending = sorted(range(len(seqs)), key=lambda i: arrivals[i])
    while pending or len(sched):
        while pending and arrivals[pending[0]] <= step and not sched.full():
            i = pending.pop(0)
            uid_of[sched.add(seqs[i])] = i
        with torch.inference_mode():
            for f in sched.step():
                out[uid_of[f.uid]] = f
        step += 1
    return [out[i] for i in range(len(seqs))]

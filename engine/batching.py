"""Continuous (iteration-level) batching: sequences join the running batch at the next step and
leave it as soon as they finish.

Every step is one forward over a mix of sequences: each decoding sequence feeds its last token,
and prefilling sequences feed the next chunk of their prompt with what is left of the step's
token budget (oldest first), so a long prompt is spread over several steps instead of stalling
every other sequence's next token. The exact engine is batch-invariant and chunk-invariant (every
op is per token except attention, which is per sequence), so what a sequence computes, and so its
receipt, does not depend on which sequences shared its steps or how its prompt was split: the
tests compare receipts byte for byte with the sequence run alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..verifier.outputs import StopScan
from .commit import Committer
from .exact.model import ExactModel, SeqCache
from .generate import Recorder, Result, check_request, pick, prompt_entries
from .receipts import SeqRequest, sign_one

DEFAULT_TOKEN_BUDGET = 256  # tokens per step: decodes first, then prefill chunks


@dataclass
class Running:
    """One sequence in the scheduler: its request, cache, what it produced so far."""

    uid: int
    seq: SeqRequest
    on_token: Callable[[int], None] | None
    cancelled: Callable[[], bool]
    result: Result
    cache: SeqCache = field(default_factory=SeqCache)
    stop: StopScan | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    next_token: int | None = None  # sampled, not yet fed (a decoding sequence)

    @property
    def decoding(self) -> bool:
        return self.next_token is not None


@dataclass
class Finished:
    """A sequence that left the batch: its transcript (None when cancelled) or the error."""

    uid: int
    result: Result
    transcript: dict | None = None
    error: Exception | None = None


class Scheduler:
    """The running batch of a serving engine. add() a sequence at any time; step() runs one
    forward over the batch and returns the sequences that finished in it, signed."""

    def __init__(self, model: ExactModel, tokenizer, eos_ids,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, max_seqs: int = 16):
        if token_budget <= max_seqs:
            raise ValueError(f"the token budget per step ({token_budget}) must exceed the most "
                             f"sequences in a step ({max_seqs}): decodes would leave no room "
                             "for prefill")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, tuple(eos_ids)
        self.token_budget, self.max_seqs = token_budget, max_seqs
        self.running: list[Running] = []  # in admission order
        self.recorder = Recorder()
        self.committer = Committer(model, tokenizer)
        _ = self.committer.model_commitment, self.committer._hashes
        self._uid = 0
        self.steps = self.step_tokens = self.step_seqs = 0

    def __len__(self) -> int:
        return len(self.running)

    def full(self) -> bool:
        return len(self.running) >= self.max_seqs

    def add(self, seq: SeqRequest, on_token: Callable[[int], None] | None = None,
            cancelled: Callable[[], bool] = lambda: False) -> int:
        """Admit a sequence (ValueError for a request the model cannot run); returns its id."""
        if seq.max_tokens < 1:
            raise ValueError("a receipt needs at least one generated token (max_tokens >= 1)")
        check_request([seq.prompt_ids], seq.max_tokens, self.model.cfg.vocab_size,
                      self.model.cfg.max_position_embeddings)
        if self.tokenizer is None and seq.output.stop:
            raise ValueError("stop strings need the model's tokenizer")
        res = Result(list(seq.prompt_ids))
        if seq.output.logprobs is not None:
            res.logprobs = []
            res.prompt_logprobs = [] if seq.output.prompt_logprobs else None
        stop = (StopScan(self.tokenizer, seq.output, self.eos_ids, seq.max_tokens)
                if self.tokenizer is not None else None)
        uid, self._uid = self._uid, self._uid + 1
        self.running.append(Running(uid, seq, on_token, cancelled, res, stop=stop))
        return uid

    def plan(self) -> list[tuple[Running, list[int]]]:
        """This step's (sequence, tokens to feed): every decoding sequence one token, then the
        prefilling ones chunks of their prompts from what is left of the budget."""
        work = [(r, [r.next_token]) for r in self.running if r.decoding]
        left = self.token_budget - len(work)
        for r in self.running:
            if r.decoding or left <= 0:
                continue
            n = min(len(r.seq.prompt_ids) - r.prefilled, left)
            work.append((r, r.seq.prompt_ids[r.prefilled:r.prefilled + n]))
            left -= n
        return work

    def step(self) -> list[Finished]:
        """One forward; the sequences that finished (or were cancelled) in it. An error of the
        forward itself is raised after every running sequence was failed with it."""
        done = [self._leave(r, None) for r in self.running if r.cancelled()]
        work = self.plan()
        if not work:
            return done
        everything = any(not r.decoding and r.result.prompt_logprobs is not None
                         for r, _ in work)
        try:
            out = self.recorder.step(self.model, [r.uid for r, _ in work],
                                     [r.cache for r, _ in work], [t for _, t in work],
                                     all_logits=everything)
        except Exception as e:
            for r in list(self.running):
                done.append(self._leave(r, None, e))
            raise StepError(e, done) from e
        self.steps += 1
        self.step_tokens += sum(len(t) for _, t in work)
        self.step_seqs += len(work)
        for (r, toks), logits in zip(work, out):
            if not r.decoding:
                if everything and r.result.prompt_logprobs is not None:
                    prompt_entries(r.result, r.prefilled, logits, r.seq.output.logprobs)
                r.prefilled += len(toks)
                if r.prefilled < len(r.seq.prompt_ids):
                    continue  # more prompt to come
            params = replace(r.seq.params, nonce=r.seq.nonce)
            on_token = None if r.on_token is None else (lambda _i, t, f=r.on_token: f(t))
            tok = pick(logits[-1:], params, r.result, on_token, r.uid, self.eos_ids,
                       r.seq.max_tokens, r.stop, r.seq.output.logprobs)
            if tok is None:
                done.append(self._finish(r))
            else:
                r.next_token = tok
        return done

    def _finish(self, r: Running) -> Finished:
        try:
            resid = self.recorder.residuals(r.uid, self.model.cfg.num_layers)
            tr = sign_one(self.committer, self.model, r.seq, r.result, resid, r.cache,
                          self.eos_ids)
        except Exception as e:  # noqa: BLE001 - this sequence gets the error, not the batch
            return self._leave(r, None, e)
        return self._leave(r, tr)

    def _leave(self, r: Running, transcript: dict | None, error: Exception | None = None):
        self.running.remove(r)
        self.recorder.drop(r.uid)
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
            max_seqs: int = 16) -> list[Finished]:
    """Run seqs through a scheduler; arrivals[i]: the step before which sequence i is added
    (default all at once), so tests can stagger them. Results in the order of seqs."""
    arrivals = [0] * len(seqs) if arrivals is None else arrivals
    sched = Scheduler(model, tokenizer, eos_ids, token_budget, max_seqs)
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

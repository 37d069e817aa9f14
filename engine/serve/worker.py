"""The engine worker: one thread that takes the pending requests and runs them as one batch.

Requests that arrive while a batch runs go into the next batch. The exact engine is batch-
invariant, so a receipt does not depend on which requests shared its batch. A receipt is stored
durably before its request is answered; openings re-execute under the same lock as generation."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..open import build_opening
from ..receipts import SeqRequest, sign_batch

PURGE_EVERY_S = 3600.0  # transcripts past the retention are dropped at most this often


@dataclass
class Job:
    seq: SeqRequest
    on_token: Callable[[int], None] | None = None
    done: Future = field(default_factory=Future)  # -> (receipt, finish_reason)


@dataclass
class Stats:
    batches: int = 0
    requests: int = 0
    largest_batch: int = 0


class Worker:
    def __init__(self, model, tokenizer, eos_ids, store, extra: dict, max_batch: int = 16,
                 batch_wait_s: float = 0.005, start: bool = True):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.store, self.extra = store, extra
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.lock = threading.Lock()  # one user of the model at a time: a batch or an opening
        self.stats = Stats()
        self._purged = time.monotonic()
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="commitllm-engine", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the engine thread (tests queue requests first to fix a batch's make-up)."""
        self._thread.start()

    def submit(self, job: Job) -> Future:
        self._q.put(job)
        return job.done

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=60)

    def open(self, challenge: dict):
        """(meta, arrays) of the opening; KeyError for an unknown receipt, OpenError on mismatch."""
        transcript = self.store.get(str(challenge.get("receipt_id")))
        with self.lock:
            return build_opening(self.model, transcript, challenge)

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                batch.append(nxt)
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        def on_token(i: int, t: int) -> None:
            if batch[i].on_token is not None:
                batch[i].on_token(t)
        try:
            with self.lock:
                signed = sign_batch(self.model, self.tokenizer, [j.seq for j in batch],
                                    self.eos_ids, on_token)
        except Exception as e:  # noqa: BLE001 - every waiting request learns why
            for j in batch:
                j.done.set_exception(e)
            return
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for j, tr, res in zip(batch, signed.transcripts, signed.results):
            try:  # stored (durably) before answered: a receipt the client holds can be opened
                self.store.put(tr["receipt"], tr["seed"], bytes.fromhex(tr["salt"]), self.extra)
            except Exception as e:  # noqa: BLE001
                j.done.set_exception(e)
                continue
            j.done.set_result((tr["receipt"], res.finish_reason))
        if time.monotonic() - self._purged > PURGE_EVERY_S and hasattr(self.store, "purge"):
            self.store.purge()
            self._purged = time.monotonic()

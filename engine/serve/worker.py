"""The engine worker: one thread that runs the requests on the model.

Continuous batching (the default, engine/batching.py): a request joins the running batch at the
next step and leaves it the step it finishes; prompts are prefilled in chunks beside the decodes
under a per-step token budget. Static batching (`serve --batching static`, kept for comparison):
the pending requests run as one batch, and requests that arrive meanwhile wait for the next. The
exact engine is batch-invariant, so a receipt does not depend on either choice or on which
requests shared its steps. A receipt is stored durably before its request is answered.

Openings re-execute on the audit thread, taking the model lock for one prefill chunk at a time
(engine/open.py): the lock is first come, first served (FairLock), so generation steps and an
opening's chunks alternate, and a step waits for at most one chunk of one opening (the server
runs openings one at a time from their own bounded queue, app.py). A static batch holds the lock
for its whole run.

Tensor-parallel (`serve --tp N`): the model is rank 0 of a group. Every use of it is serialized by
the lock, an idle worker sends a heartbeat so the followers' wait for the next command stays inside
their collective timeout, and a failed collective marks the worker down (`fatal`): pending and
later requests are refused and `on_fatal` is called (the server then shuts down)."""

from __future__ import annotations

import queue
import threading
import time
import traceback
from contextlib import contextmanager
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..batching import DEFAULT_TOKEN_BUDGET, Refused, Scheduler, StepError
from ..exact.paged import DEFAULT_BLOCK, KVPool
from ..prefix import PrefixCache
from ..open import build_opening
from ..receipts import SeqRequest, sign_batch
from ..tp.comm import TPError

PURGE_EVERY_S = 3600.0  # transcripts past the retention are dropped at most this often


@dataclass
class Job:
    seq: SeqRequest
    on_token: Callable[[int], None] | None = None
    done: Future = field(default_factory=Future)  # -> (receipt, finish_reason)
    cancelled: bool = False  # set when the client went away: generation stops, nothing is stored


class Cancelled(Exception):
    """The client disconnected; the request was dropped from its batch without a receipt."""


@dataclass
class Stats:
    batches: int = 0  # static batches, or forward steps of the continuous scheduler
    requests: int = 0
    largest_batch: int = 0  # most sequences in one batch or step
    cancelled: int = 0
    batched: int = 0  # sequences summed over batches or steps (mean_batch = batched / batches)
    step_tokens: int = 0  # tokens fed summed over steps (continuous)
    failed: int = 0
    preemptions: int = 0  # sequences whose K/V blocks were given up and recomputed


class FairLock:
    """A lock granted in the order it was asked for (threading.Lock lets a thread that releases
    and re-acquires in a loop starve the others)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next, self._serving, self._held = 0, 0, False

    def acquire(self, blocking: bool = True) -> bool:
        with self._cond:
            if not blocking:
                if self._held or self._next != self._serving:
                    return False
                self._next += 1
                self._held = True
                return True
            ticket, self._next = self._next, self._next + 1
            while self._held or ticket != self._serving:
                self._cond.wait()
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class WorkerDown(RuntimeError):
    """The model can no longer be used (a tensor-parallel rank died or timed out)."""


class Worker:
    def __init__(self, model, tokenizer, eos_ids, store, extra: dict, max_batch: int = 16,
                 batch_wait_s: float = 0.005, start: bool = True, heartbeat_s: float | None = None,
                 on_fatal: Callable[[str], None] | None = None,
                 release: Callable[[bool], None] | None = None, batching: str = "continuous",
                 token_budget: int = DEFAULT_TOKEN_BUDGET, kv_cache_bytes: int | None = None,
                 prefix_cache: bool = False, kv_block: int = DEFAULT_BLOCK):
        """heartbeat_s: call model.heartbeat() after this long idle (tensor-parallel models);
        release(failed): frees the model at stop() (stops the tensor-parallel ranks).
        batching: 'continuous' (max_batch sequences at a time, token_budget tokens a step) or
        'static' (up to max_batch pending requests as one batch). kv_cache_bytes: continuous
        batching keeps K/V rows in a paged pool of this size (None: per-sequence buffers);
        prefix_cache: reuse the K/V blocks of shared prefixes (needs the pool)."""
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', got {batching!r}")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.store, self.extra = store, extra
        self.batching, self.token_budget = batching, token_budget
        self.pool = self.prefix = None
        if kv_cache_bytes is not None and batching == "continuous":
            self.pool = KVPool(model.cfg, model.profile, kv_cache_bytes, kv_block,
                               device=getattr(model, "device", None))
            self.prefix = PrefixCache(self.pool) if prefix_cache else None
        self.kv_peak_blocks = 0
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        # built here so a bad budget is refused at construction (Scheduler checks it)
        self.sched = Scheduler(model, tokenizer, eos_ids, token_budget, max_batch, self.pool,
                               self.prefix) if batching == "continuous" else None
        self.heartbeat_s, self.on_fatal, self.release = heartbeat_s, on_fatal, release
        self.fatal: str | None = None
        self.lock = FairLock()  # one user of the model at a time: a batch or an opening
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
        if self.fatal is not None:
            raise WorkerDown(self.fatal)
        self._q.put(job)
        return job.done

    def stop(self) -> None:
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        if self.release is not None:
            release, self.release = self.release, None
            release(self.fatal is not None)

    def open(self, challenge: dict, transcript: dict | None = None):
        """(meta, arrays) of the opening; KeyError for an unknown receipt, OpenError on mismatch,
        WorkerDown once the model is unusable. transcript: the stored one (read here if None)."""
        if transcript is None:
            transcript = self.store.get(str(challenge.get("receipt_id")))
        if self.fatal is not None:
            raise WorkerDown(self.fatal)
        try:
            return build_opening(self.model, transcript, challenge, guard=self._guard)
        except TPError as e:
            self._down(str(e))
            raise WorkerDown(self.fatal) from None

    @contextmanager
    def _guard(self):
        """The model lock around one use of the model by an opening (one prefill chunk)."""
        with self.lock:
            if self.fatal is not None:
                raise WorkerDown(self.fatal)
            yield

    def _down(self, why: str) -> None:
        """The tensor-parallel group is gone: refuse everything from now on."""
        if self.fatal is None:
            self.fatal = f"the tensor-parallel group failed: {why}"
            if self.on_fatal is not None:
                try:
                    self.on_fatal(self.fatal)
                except Exception:  # noqa: BLE001 - the worker keeps refusing requests regardless
                    traceback.print_exc()

    def _next(self):
        """The next job; while idle, heartbeats keep tensor-parallel followers waiting."""
        while True:
            try:
                return self._q.get(timeout=self.heartbeat_s)
            except queue.Empty:
                if self.fatal is None and self.lock.acquire(blocking=False):
                    try:  # an opening holding the lock sends commands itself
                        self.model.heartbeat()
                    except TPError as e:
                        self._down(str(e))
                    finally:
                        self.lock.release()

    def _loop(self) -> None:
        if self.batching == "continuous":
            return self._loop_continuous()
        while True:
            job = self._next()
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
        for j in batch:
            if j.cancelled:  # gone before its batch started
                self.stats.cancelled += 1
                j.done.set_exception(Cancelled("the client disconnected"))
        batch = [j for j in batch if not j.cancelled]
        if not batch:
            return

        def on_token(i: int, t: int) -> None:
            if batch[i].on_token is not None:
                batch[i].on_token(t)
        try:
            with self.lock:
                if self.fatal is not None:
                    raise WorkerDown(self.fatal)
                try:
                    signed = sign_batch(self.model, self.tokenizer, [j.seq for j in batch],
                                        self.eos_ids, on_token,
                                        cancelled=lambda i: batch[i].cancelled)
                except TPError as e:
                    self._down(str(e))
                    raise WorkerDown(self.fatal) from None
        except Exception as e:  # noqa: BLE001 - every waiting request learns why
            for j in batch:
                j.done.set_exception(e)
            return
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.batched += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for j, tr, res in zip(batch, signed.transcripts, signed.results):
            if tr is None:
                self.stats.cancelled += 1
                j.done.set_exception(Cancelled("the client disconnected"))
                continue
            self._answer(j, tr, res.finish_reason)
        self._maybe_purge()

    def _answer(self, j: Job, tr: dict, reason: str) -> None:
        try:  # stored (durably) before answered: a receipt the client holds can be opened
            self.store.put(tr["receipt"], tr["seed"], bytes.fromhex(tr["salt"]), self.extra)
        except Exception as e:  # noqa: BLE001
            self.stats.failed += 1
            j.done.set_exception(e)
            return
        j.done.set_result((tr["receipt"], reason))

    def _maybe_purge(self) -> None:
        if time.monotonic() - self._purged > PURGE_EVERY_S and hasattr(self.store, "purge"):
            self.store.purge()
            self._purged = time.monotonic()

    def _loop_continuous(self) -> None:
        """Admit pending jobs between steps (up to max_batch running), run one step under the
        model lock, answer the jobs that finished in it; block on the queue only when idle."""
        sched = self.sched
        jobs: dict[int, Job] = {}
        stopping = False
        while True:
            if not len(sched):
                if stopping:
                    return
                job = self._next()
                if job is None:
                    return
                self._admit(sched, jobs, job)
            while not stopping and not sched.full():
                try:
                    job = self._q.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True  # finish what runs, admit nothing more
                else:
                    self._admit(sched, jobs, job)
            if not len(sched):
                continue
            try:
                with self.lock:
                    if self.fatal is not None:
                        raise WorkerDown(self.fatal)
                    finished = sched.step()
                    n_work = len(sched.last_work)
            except StepError as e:
                cause = e.cause
                if isinstance(cause, TPError):
                    self._down(str(cause))
                    cause = WorkerDown(self.fatal)
                self._settle(jobs, e.finished, cause)
                continue
            except Exception as e:  # noqa: BLE001 - WorkerDown, or a bug outside the forward:
                self._settle(jobs, sched.abort(e), e)  # every running request learns why, and
                continue  # the worker goes on with the next ones
            self.stats.batches += 1
            self.stats.batched += n_work
            self.stats.step_tokens = sched.step_tokens
            self.stats.preemptions = sched.preemptions
            if self.pool is not None:
                self.kv_peak_blocks = max(self.kv_peak_blocks, self.pool.used_blocks())
            self.stats.largest_batch = max(self.stats.largest_batch, n_work)
            self._settle(jobs, finished)
            self._maybe_purge()

    def _settle(self, jobs: dict, finished, error: Exception | None = None) -> None:
        """Answer the jobs of sequences that left the batch: a receipt, a cancellation, or their
        error (`error` instead of each one's own, when given)."""
        for f in finished:
            j = jobs.pop(f.uid)
            if f.transcript is None and f.error is None:
                self.stats.cancelled += 1
                j.done.set_exception(Cancelled("the client disconnected"))
            elif f.error is not None:
                self.stats.failed += 1
                j.done.set_exception(error or f.error)
            else:
                self.stats.requests += 1
                self._answer(j, f.transcript, f.result.finish_reason)

    def kv_stats(self) -> dict | None:
        """The K/V pool's size and use (continuous batching with a pool), prefix-cache hits."""
        if self.pool is None:
            return None
        p = self.pool
        out = {"bytes": p.nbytes, "block_positions": p.block_size, "blocks": p.n_blocks,
               "used_blocks": p.used_blocks(), "peak_used_blocks": self.kv_peak_blocks}
        if self.prefix is not None:
            out["prefix_cache"] = self.prefix.stats()
        return out

    def _admit(self, sched: Scheduler, jobs: dict, job: Job) -> None:
        if job.cancelled:  # gone before it started
            self.stats.cancelled += 1
            job.done.set_exception(Cancelled("the client disconnected"))
            return
        try:
            uid = sched.add(job.seq, job.on_token, lambda j=job: j.cancelled)
        except Refused as e:
            self.stats.failed += 1
            job.done.set_exception(e)
            return
        jobs[uid] = job

"""Continuous batching (engine/batching.py): a receipt is byte-identical whether its sequence ran
alone (a static batch of one), joined a running batch at any step, had its prompt split over steps
by any token budget, or left early beside others; and its opening verifies."""

from __future__ import annotations

import json
import os

import pytest
from tinymodels import make_tiny_chat_model

from commitllm.engine.batching import Scheduler, StepError, run_all
from commitllm.engine.exact.model import ExactModel
from commitllm.engine.loader import load_model
from commitllm.engine.receipts import SeqRequest, sign_batch
from commitllm.keys.keygen import build_key, key_tokenizer
from commitllm.verifier import challenge as ch
from commitllm.verifier.numerics.profiles import get_profile
from commitllm.verifier.numerics.sampler import SamplingParams
from commitllm.verifier.numerics.weights import quantize_model
from commitllm.verifier.outputs import OutputPolicy
from commitllm.verifier.verify import verify
from commitllm.engine.open import build_opening

SAMPLED = SamplingParams(0.9, 20, 0.95, 7)
EOS = (2,)  # the tiny chat model's


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    loaded = load_model(str(make_tiny_chat_model(tmp_path_factory.mktemp("batching") / "m")))
    qm = quantize_model(loaded.cfg, loaded.tensors, get_profile("w8a16"))
    return ExactModel(qm), loaded.tokenizer, qm


def _seqs(tok, n=6):
    """Prompts of very different lengths and decode settings (stop strings, logprobs, echo)."""
    texts = ["hello there", "a" * 70, "the quick brown fox jumps", "x", "lorem ipsum " * 6,
             "abc def"][:n]
    outs = [OutputPolicy(), OutputPolicy(logprobs=2), OutputPolicy(stop=("e",)),
            OutputPolicy(logprobs=3, echo=True), OutputPolicy(stop_token_ids=(5,)),
            OutputPolicy()][:n]
    return [SeqRequest({"prompt": t}, tok.encode(t), SAMPLED if i % 2 else SamplingParams(),
                       6 + 3 * i, f"nonce-{i}", bytes([i]) * 16, o)
            for i, (t, o) in enumerate(zip(texts, outs))]


def _alone(model, tok, seqs):
    return [json.dumps(sign_batch(model, tok, [s], EOS).transcripts[0], sort_keys=True)
            for s in seqs]


def _opening_bytes(opening) -> bytes:
    from commitllm.verifier import container
    from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION

    return container.dumps(OPENING_MAGIC, OPENING_VERSION, *opening)


def _dump(fin):
    assert fin.error is None, fin.error
    return json.dumps(fin.transcript, sort_keys=True)


@pytest.mark.parametrize("budget,arrivals", [
    (256, None),  # all at once, each prompt in one step
    (17, None),  # long prompts spread over several steps, beside decodes
    (9, [0, 0, 3, 3, 7, 20]),  # staggered arrivals into a running batch
    (64, [5, 4, 3, 2, 1, 0]),  # the reverse order of admission
])
def test_receipts_identical_to_alone(world, budget, arrivals):
    model, tok, _ = world
    seqs = _seqs(tok)
    alone = _alone(model, tok, seqs)
    got = run_all(model, tok, EOS, seqs, arrivals, token_budget=budget, max_seqs=6)
    assert [_dump(f) for f in got] == alone


def test_queue_beyond_max_seqs(world):
    """More sequences than the batch holds: the later ones wait and still sign the same bytes."""
    model, tok, _ = world
    seqs = _seqs(tok)
    got = run_all(model, tok, EOS, seqs, token_budget=8, max_seqs=2)
    assert [_dump(f) for f in got] == _alone(model, tok, seqs)


def test_static_batch_equals_continuous(world):
    model, tok, _ = world
    seqs = _seqs(tok)
    static = sign_batch(model, tok, seqs, EOS).transcripts
    got = run_all(model, tok, EOS, seqs, [0, 1, 2, 3, 4, 5], token_budget=12, max_seqs=4)
    assert [_dump(f) for f in got] == [json.dumps(t, sort_keys=True) for t in static]


def test_budget_bounds_every_step(world):
    """No step feeds more tokens than the budget; decodes go first, prefill fills the rest."""
    model, tok, _ = world
    sched = Scheduler(model, tok, EOS, token_budget=10, max_seqs=4)
    for s in _seqs(tok, 4):
        sched.add(s)
    steps = 0
    while len(sched):
        decoding = {r.uid: r.result.token_ids[-1] for r in sched.running if r.decoding}
        sched.step()
        work = sched.last_work
        assert sum(len(t) for _, t in work) <= 10
        assert [(r.uid, t) for r, t in work[:len(decoding)]] == [
            (u, [t]) for u, t in decoding.items()]
        steps += 1
    assert steps > 1 and sched.steps == steps


def test_cancel_mid_batch_leaves_others_unchanged(world):
    model, tok, _ = world
    seqs = _seqs(tok, 4)
    flag = {"stop": False}
    sched = Scheduler(model, tok, EOS, token_budget=32, max_seqs=4)
    uids = [sched.add(s, cancelled=(lambda: flag["stop"]) if i == 1 else (lambda: False))
            for i, s in enumerate(seqs)]
    fins, n = {}, 0
    while len(sched):
        n += 1
        flag["stop"] = n >= 3
        for f in sched.step():
            fins[f.uid] = f
    assert fins[uids[1]].transcript is None and fins[uids[1]].result.finish_reason == "cancelled"
    alone = _alone(model, tok, seqs)
    assert [_dump(fins[u]) for i, u in enumerate(uids) if i != 1] == alone[:1] + alone[2:]


def test_tokens_streamed_in_order(world):
    model, tok, _ = world
    seqs = _seqs(tok, 3)
    seen = {i: [] for i in range(3)}
    sched = Scheduler(model, tok, EOS, token_budget=16, max_seqs=3)
    uids = [sched.add(s, on_token=seen[i].append) for i, s in enumerate(seqs)]
    fins = {}
    while len(sched):
        fins.update({f.uid: f for f in sched.step()})
    for i, u in enumerate(uids):
        assert seen[i] == fins[u].result.token_ids == fins[u].transcript["receipt"][
            "output_token_ids"]


def test_bad_request_refused_at_admission(world):
    model, tok, _ = world
    sched = Scheduler(model, tok, EOS, token_budget=16, max_seqs=2)
    good = _seqs(tok, 1)[0]
    with pytest.raises(ValueError, match="context length"):
        sched.add(SeqRequest({"prompt": "x"}, [3] * 250, SamplingParams(), 10, "n"))
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add(SeqRequest({"prompt": "x"}, [3], SamplingParams(), 0, "n"))
    with pytest.raises(ValueError, match="exceed"):
        Scheduler(model, tok, EOS, token_budget=4, max_seqs=4)
    assert len(sched) == 0
    sched.add(good)
    assert len(sched) == 1


def test_forward_error_fails_every_running_sequence(world):
    model, tok, _ = world
    sched = Scheduler(model, tok, EOS, token_budget=32, max_seqs=3)
    for s in _seqs(tok, 3):
        sched.add(s)
    sched.step()

    def boom(*_a, **_k):
        raise RuntimeError("device lost")
    sched.model = type("Broken", (), {"forward": boom, "cfg": model.cfg})()
    with pytest.raises(StepError) as e:
        sched.step()
    assert len(e.value.finished) == 3 and all(f.error is not None for f in e.value.finished)
    assert len(sched) == 0


def test_continuous_receipt_opens_and_verifies(world):
    model, tok, qm = world
    key = build_key(qm, tok, secret=bytes(range(32)))
    seqs = _seqs(tok)
    for fin in run_all(model, tok, EOS, seqs, [0, 2, 2, 4, 5, 9], token_budget=11, max_seqs=3):
        r = fin.transcript["receipt"]
        c = ch.derive(key.secret, r, "deep", nonce=b"n" * 16)
        meta, arrays = build_opening(model, fin.transcript, c)
        v = verify(key, r, c, meta, arrays, key_tokenizer(key), io_binding=True)
        assert v.accepted, (v.reason, v.detail)


def _worker(world, tmp_path, **kw):
    from commitllm.engine.serve.store import SqliteStore
    from commitllm.engine.serve.worker import Worker

    model, tok, _ = world
    return Worker(model, tok, EOS, SqliteStore(tmp_path / "store"), {}, **kw)


def _long(tok, n_new, text="tell me a long story", nonce="long"):
    return SeqRequest({"prompt": text}, tok.encode(text), SamplingParams(1.0, 0, 1.0, 3), n_new,
                      nonce, output=OutputPolicy(stop_token_ids=()))


def test_worker_short_request_overtakes_long_one(world, tmp_path):
    """A request that arrives while a long one runs joins the batch at once and finishes first;
    under static batching it waits for the whole batch ahead of it."""
    import threading
    import time

    from commitllm.engine.serve.worker import Job

    _, tok, _ = world
    for batching, overtakes in (("continuous", True), ("static", False)):
        w = _worker(world, tmp_path / batching, batching=batching)
        started, order = threading.Event(), []
        long_job = Job(_long(tok, 150), on_token=lambda _t: started.set())
        f_long = w.submit(long_job)
        f_long.add_done_callback(lambda _f: order.append("long"))
        assert started.wait(30)
        time.sleep(0.01)
        f_short = w.submit(Job(_long(tok, 2, "hi", "short")))
        f_short.add_done_callback(lambda _f: order.append("short"))
        f_short.result(60), f_long.result(60)
        w.stop()
        assert (order == ["short", "long"]) is overtakes, (batching, order)


def test_opening_interleaves_with_generation(world, tmp_path, monkeypatch):
    """An opening takes the model lock one prefill chunk at a time: generation steps run between
    its chunks instead of waiting for the whole re-execution; the opening still verifies."""
    import threading
    import time

    from commitllm.engine import open as open_mod
    from commitllm.engine.serve.worker import Job

    model, tok, qm = world
    monkeypatch.setattr(open_mod, "CHUNK", 8)
    w = _worker(world, tmp_path)
    receipt, _ = w.submit(Job(_long(tok, 120))).result(60)
    key = build_key(qm, tok, secret=bytes(range(32)))
    c = ch.derive(key.secret, receipt, "routine", nonce=b"n" * 16)
    times, started = [], threading.Event()
    gen = w.submit(Job(_long(tok, 100, "another story", "gen"),
                       on_token=lambda _t: (times.append(time.monotonic()), started.set())))
    assert started.wait(30)
    a = time.monotonic()
    meta, arrays = w.open(c)
    b = time.monotonic()
    gen.result(60)
    w.stop()
    during = [t for t in times if a < t < b]
    assert len(during) >= 5, (len(during), len(times))  # 16 chunks: steps ran between them
    v = verify(key, receipt, c, meta, arrays, key_tokenizer(key), io_binding=True)
    assert v.accepted, (v.reason, v.detail)


# -- the paged K/V pool, preemption and the prefix cache -------------------------------------


def _pool(model, blocks: int, block_size: int = 4):
    from commitllm.engine.exact.paged import KVPool

    probe = KVPool(model.cfg, model.profile, 1 << 30, block_size)
    return KVPool(model.cfg, model.profile, blocks * probe.block_bytes, block_size)


def test_paged_cache_rows_equal_seq_cache(world):
    """A forward over the paged cache gives the same logits and rows as over SeqCache, chunked
    across block boundaries; the pool's size is fixed at creation."""
    import torch
    from commitllm.engine.exact.model import SeqCache
    from commitllm.engine.exact.paged import PagedCache

    model, tok, _ = world
    pool = _pool(model, 12, block_size=5)
    size = pool.nbytes
    ids = tok.encode("the quick brown fox jumps over the lazy dog")
    a, b = SeqCache(), PagedCache(pool)
    outs = []
    for cache in (a, b):
        got, at = [], 0
        for n in (7, 1, 11, 1, 1, 20):
            part = ids[at:at + n]
            if isinstance(cache, PagedCache):
                assert cache.reserve(len(part))
            got.append(model.forward([cache], [part], all_logits=True)[0])
            at += n
        outs.append(torch.cat(got))
    assert torch.equal(outs[0], outs[1])
    for l in range(model.cfg.num_layers):
        for name in ("k", "sk", "v", "sv"):
            assert torch.equal(getattr(a, name)[l], getattr(b, name)[l])
    assert pool.nbytes == size and pool.used_blocks() == 9  # 41 positions in blocks of 5
    b.free()
    assert pool.used_blocks() == 0 and pool.free_blocks() == 12


def test_pool_refuses_what_cannot_fit(world):
    model, tok, _ = world
    from commitllm.engine.exact.paged import KVPool

    with pytest.raises(ValueError, match="holds no block"):
        KVPool(model.cfg, model.profile, 100, 16)
    sched = Scheduler(model, tok, EOS, 32, 4, pool=_pool(model, 3))
    with pytest.raises(ValueError, match="K/V blocks"):
        sched.add(SeqRequest({"prompt": "x"}, [5] * 10, SamplingParams(), 5, "n"))
    assert len(sched) == 0


@pytest.mark.parametrize("blocks", [60, 30, 24])
def test_pool_pressure_preempts_and_receipts_unchanged(world, blocks):
    """A pool too small for every sequence at once: prefills wait, decodes preempt the youngest
    (recomputed later, exactly); every receipt is the bytes of the sequence run alone, and the
    pool never holds more than its blocks."""
    model, tok, _ = world
    seqs = _seqs(tok)
    pool = _pool(model, blocks)
    sched = Scheduler(model, tok, EOS, 40, 6, pool=pool)
    for s in seqs:
        sched.add(s)
    fins, peak = {}, 0
    while len(sched):
        for f in sched.step():
            fins[f.uid] = f
        peak = max(peak, pool.used_blocks())
    assert peak <= blocks and pool.used_blocks() == 0
    assert [_dump(fins[i]) for i in range(len(seqs))] == _alone(model, tok, seqs)
    if blocks <= 30:
        assert sched.preemptions > 0


def _shared_prefix_seqs(tok):
    system = "you are a terse assistant. answer in one word. "
    return [SeqRequest({"prompt": system + q}, tok.encode(system + q),
                       SAMPLED if i % 2 else SamplingParams(), 5 + i, f"p{i}", bytes([i]) * 16,
                       OutputPolicy(logprobs=1) if i == 2 else OutputPolicy())
            for i, q in enumerate(["sky?", "sea?", "sun?", "sky?", "moon and stars?"])]


@pytest.mark.parametrize("blocks", [400, 20])
def test_prefix_cache_hits_and_receipts_unchanged(world, blocks):
    """Requests sharing a system prompt reuse its blocks (hits counted); with the cache on, off,
    and under eviction pressure, every receipt is the same bytes as alone, and each opens."""
    from commitllm.engine.prefix import PrefixCache

    model, tok, qm = world
    seqs = _shared_prefix_seqs(tok)
    alone = _alone(model, tok, seqs)
    pool = _pool(model, blocks)
    prefix = PrefixCache(pool)
    # one after another, so every later request can find the earlier ones' blocks
    got = run_all(model, tok, EOS, seqs, [0, 20, 40, 60, 80], token_budget=64, max_seqs=2,
                  pool=pool, prefix=prefix)
    assert [_dump(f) for f in got] == alone
    st = prefix.stats()
    assert st["hits"] >= 3 and st["hit_tokens"] >= 3 * 48
    if blocks == 20:
        assert st["evictions"] > 0
    again = run_all(model, tok, EOS, seqs, token_budget=64, max_seqs=5, pool=pool,
                    prefix=prefix)  # all at once, the cache warm
    assert [_dump(f) for f in again] == alone
    key = build_key(qm, tok, secret=bytes(range(32)))
    for fin, ref in zip(again[:2], alone):
        r = fin.transcript["receipt"]
        c = ch.derive(key.secret, r, "deep", nonce=b"n" * 16)
        opening = build_opening(model, fin.transcript, c)
        assert _opening_bytes(opening) == _opening_bytes(
            build_opening(model, json.loads(ref), c))  # the opening's bytes too
        v = verify(key, r, c, *opening, key_tokenizer(key), io_binding=True)
        assert v.accepted, (v.reason, v.detail)


def test_prefix_cache_skipped_for_prompt_logprobs(world):
    from commitllm.engine.prefix import PrefixCache

    model, tok, _ = world
    pool = _pool(model, 200)
    prefix = PrefixCache(pool)
    text = "the same prompt, asked twice, with echo"
    seqs = [SeqRequest({"prompt": text}, tok.encode(text), SamplingParams(), 4, f"e{i}",
                       bytes(16), OutputPolicy(logprobs=2, echo=True)) for i in range(2)]
    got = run_all(model, tok, EOS, seqs, [0, 10], pool=pool, prefix=prefix)
    assert prefix.lookups == 0
    assert [_dump(f) for f in got] == _alone(model, tok, seqs)


def test_worker_survives_a_scheduler_bug(world, tmp_path, monkeypatch):
    """An error outside the forward (here: planning) fails the requests that were running with
    that error and the worker goes on serving the next ones."""
    from commitllm.engine import batching
    from commitllm.engine.serve.worker import Job

    _, tok, _ = world
    real, calls = batching.Scheduler.plan, {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("planning bug")
        return real(self)
    monkeypatch.setattr(batching.Scheduler, "plan", flaky)
    w = _worker(world, tmp_path)
    first = w.submit(Job(_long(tok, 20)))
    with pytest.raises(RuntimeError, match="planning bug"):
        first.result(60)
    receipt, reason = w.submit(Job(_long(tok, 3, "after", "after"))).result(60)
    w.stop()
    assert receipt["output_token_ids"] and w.stats.failed == 1


@pytest.mark.parametrize("seed", range(int(os.environ.get("COMMITLLM_SCHEDULE_SEEDS", "6"))))
def test_random_schedules_under_pressure(world, seed):
    """Random arrivals, budgets, batch sizes, pool sizes and prefix caching: every receipt is the
    bytes of its sequence run alone, and the pool is empty at the end."""
    import random

    from commitllm.engine.prefix import PrefixCache

    model, tok, _ = world
    rnd = random.Random(seed)
    seqs = _seqs(tok) + _shared_prefix_seqs(tok)[:3]
    rnd.shuffle(seqs)
    bs = rnd.choice([2, 4, 8])
    longest = max(len(s.prompt_ids) + s.max_tokens for s in seqs)
    pool = _pool(model, max(rnd.choice([20, 24, 32, 200]), -(-longest // bs)), block_size=bs)
    prefix = PrefixCache(pool) if rnd.random() < 0.7 else None
    max_seqs = rnd.randint(1, 6)
    got = run_all(model, tok, EOS, seqs, [rnd.randint(0, 30) for _ in seqs],
                  token_budget=rnd.randint(max_seqs + 1, 48), max_seqs=max_seqs, pool=pool,
                  prefix=prefix)
    assert [_dump(f) for f in got] == _alone(model, tok, seqs)
    assert pool.used_blocks() == 0
    if prefix is not None:  # the idle count eviction relies on is the one a scan gives
        assert prefix.idle == len(prefix._of_block) == prefix.stats()["blocks"]
        assert prefix.idle + len(pool._free) == pool.n_blocks


def test_short_prompt_is_not_stuck_behind_long_prefills(world):
    """Fair prefill shares: a short prompt admitted beside two long ones gets its first token in
    its first step (oldest-first chunking would make it wait for both long prompts)."""
    model, tok, _ = world
    long_a, long_b = (SeqRequest({"prompt": t}, tok.encode(t), SamplingParams(), 2, n)
                      for t, n in (("a" * 150, "a"), ("b" * 150, "b")))
    short = SeqRequest({"prompt": "hi"}, tok.encode("hi"), SamplingParams(), 2, "s")
    sched = Scheduler(model, tok, EOS, token_budget=24, max_seqs=3)
    seen = []
    for s, name in ((long_a, "a"), (long_b, "b"), (short, "s")):
        sched.add(s, on_token=lambda _t, n=name: seen.append((n, sched.steps)))
    while len(sched):
        sched.step()
    first = {n: step for n, step in reversed(seen)}
    assert first["s"] == 1  # the first step's forward already gave the short prompt its token
    assert first["a"] > 5 and first["b"] > 5

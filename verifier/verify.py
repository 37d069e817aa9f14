"""verify(key, receipt, challenge, opening) -> Verdict: every check in order, fail closed."""

from __future__ import annotations

import dataclasses
import hmac
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import challenge as challenge_mod
from . import native
from . import request as request_mod
from .commitment import embed_leaf, layer_roots_match, leaf_digests, prepare_proof
from .config import ModelConfig
from .merkle import verify_multiproof, verify_multiproof_rows
from .numerics.profiles import Profile
from .native.bridge import rope_rows
from .numerics.rope import RopeTable
from .numerics.sampler import SamplingParams
from .opened import check_range, check_types
from .opening import Plan, PlanError, array_specs, embed_specs, matrices, plan
from .outputs import OutputPolicy, StopScan, returned_text
from .receipt import ReceiptError, check_receipt, seed_commitment
from .replay import Ctx, Reject, RowTable, Timer, prepare_layers, replay_decode, replay_layer

UNITS = True  # verify a layer at a time (_units); off: always the canonical order (_in_order)

MANIFEST_KEYS = ("spec_version", "numerics_digest", "model_commitment", "rope_digest",
                 "tokenizer_hash", "chat_template_hash")


@dataclass
class Verdict:
    accepted: bool = False
    reason: str | None = None  # code of the first failing check
    detail: str | None = None
    checks: list = field(default_factory=list)
    unchecked: list = field(default_factory=list)  # checks the caller switched off (io_binding)
    timing: dict = field(default_factory=dict)  # seconds: freivalds, attention, rest (the replay
    # parts), total; merkle (trace proofs, outside the replay); decode (the replay parts' share
    # spent on the LM head and decode policy)

    def ok(self, name: str, detail: str = "") -> None:
        self.checks.append({"check": name, "ok": True, "detail": detail})

    def to_json(self) -> dict:
        return {"accepted": self.accepted, "reason": self.reason, "detail": self.detail,
                "checks": self.checks, "unchecked": self.unchecked,
                "timing_ms": {k: round(v * 1e3, 3) for k, v in self.timing.items()}}


def verify(key, receipt, challenge, meta: dict, arrays: dict, tokenizer=None,
           expected_nonce: str | None = None, expected_request: dict | None = None,
           expected_endpoint: str | None = None, expected_text: str | None = None, *,
           io_binding: bool = True, threads: int = 1) -> Verdict:
    """Run every check; the first failure rejects with its reason code. The client's side, from
    what the client saved itself (never from the server's answer): expected_nonce, its own nonce
    (freshness); expected_request, the request body exactly as it sent it, every field checked
    against the receipt (verifier/request.py); expected_endpoint, the path it called
    (/v1/chat/completions or /v1/completions); expected_text, the content it received.
    tokenizer: the key's (keygen.key_tokenizer), for prompt and output binding; without one the
    verdict rejects with io_binding_unavailable unless the caller says io_binding=False, and then
    the verdict lists io_binding as unchecked (the receipt's text and request are not bound to its
    token ids). threads: challenged layers replayed on this many threads; the verdict, its reason
    and the checks listed are the same for every count (the first failing layer in layer order
    decides, as in one thread); timing parts are then summed over threads."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    v, t0 = Verdict(), time.perf_counter()
    timer = Timer()
    client = (expected_nonce, expected_request, expected_endpoint, expected_text)
    try:
        with _short_switch(threads > 1):
            _run(v, key, receipt, challenge, meta, arrays, tokenizer, timer, *client, io_binding,
                 threads)
        v.accepted = True
    except Reject as e:
        v.reason, v.detail = e.code, e.detail
        v.checks.append({"check": e.code, "ok": False, "detail": e.detail})
    except PlanError as e:
        v.reason, v.detail = "challenge_invalid", str(e)
        v.checks.append({"check": v.reason, "ok": False, "detail": v.detail})
    except ReceiptError as e:
        v.reason, v.detail = e.code, str(e)
        v.checks.append({"check": e.code, "ok": False, "detail": str(e)})
    except RecursionError:
        v.reason, v.detail = "receipt_malformed", "nested too deeply"
        v.checks.append({"check": v.reason, "ok": False, "detail": v.detail})
    except (FloatingPointError, OverflowError) as e:  # committed values that cannot be replayed
        v.reason, v.detail = "nonfinite", f"{type(e).__name__}: {e}"
        v.checks.append({"check": v.reason, "ok": False, "detail": v.detail})
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # malformed data
        v.reason, v.detail = "opening_malformed", f"{type(e).__name__}: {e}"
        v.checks.append({"check": "opening_malformed", "ok": False, "detail": v.detail})
    v.timing = dict(timer.parts, total=time.perf_counter() - t0, merkle=timer.merkle,
                    decode=sum(timer.decode.values()))
    return v


SWITCH_S = 0.0002  # the interpreter's switch interval while layer threads run (default 0.005)
_switch = {"users": 0, "before": None}
_switch_lock = threading.Lock()


@contextmanager
def _short_switch(on: bool):
    """With layer threads, a thread coming back from a compiled call (which released the GIL)
    waits for it up to the switch interval while another thread runs the Python between calls;
    at the default 5 ms that idles a core (routine audit at 8B / 1,024 positions on 2 threads:
    median 32.0 ms at 5 ms, 29.5 ms at 0.2 ms, same run). Lowered for the call, restored by the
    last concurrent caller."""
    if not on:
        yield
        return
    with _switch_lock:
        if _switch["users"] == 0:
            _switch["before"] = sys.getswitchinterval()
            sys.setswitchinterval(min(SWITCH_S, _switch["before"]))
        _switch["users"] += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch["users"] -= 1
            if _switch["users"] == 0:
                sys.setswitchinterval(_switch["before"])


def _run(v: Verdict, key, receipt, challenge, meta, arrays, tokenizer, timer, nonce,
         request, endpoint, text, io_binding: bool, threads: int = 1) -> None:
    cfg = ModelConfig.from_dict(key.meta["config"])
    prof = Profile(**key.meta["profile"])
    check_receipt(receipt, vocab_size=cfg.vocab_size, max_positions=cfg.max_position_embeddings)
    v.ok("receipt", "structure, manifest/request hashes, IO chain, receipt id, token count")
    if text is not None:
        try:
            shown = returned_text(receipt, tokenizer)
        except ValueError as e:
            raise Reject("text_mismatch", f"cannot rebuild the text the client was shown: {e}")
        if not (isinstance(text, str) and hmac.compare_digest(text.encode(), shown.encode())):
            raise Reject("text_mismatch", "the content the client received is not the receipt's "
                                          "text" + (" after the echoed prompt"
                                                    if shown is not receipt["text"] else ""))
        v.ok("text", "the content the client received is the receipt's text")
    if nonce is not None:
        if not hmac.compare_digest(receipt["nonce"].encode(), nonce.encode()):
            raise Reject("nonce_mismatch", "the receipt does not carry the client's nonce")
        v.ok("nonce", "the receipt carries the client's nonce")
    _check_manifest(key, receipt)
    v.ok("manifest", "spec, numerics, model commitment, RoPE, tokenizer match the key")
    reason = challenge_mod.check(key.secret, challenge, receipt, cfg.num_layers)
    if reason:
        raise Reject("challenge_invalid", reason)
    v.ok("challenge", "MAC verifies, same receipt")
    _check_opening_meta(meta, receipt, challenge)
    params = _sampling(receipt, meta)
    v.ok("opening", "for this receipt and challenge; seed commitment")
    if request is not None or endpoint is not None:
        _check_client_request(receipt, request, params, endpoint)
        v.ok("request", "the receipt's request and decode settings are the client's")
    policy = OutputPolicy.from_manifest(receipt["manifest"]["output"])
    text_rule = _check_stop_policy(receipt, key, policy, tokenizer)
    v.ok("stop_policy", "EOS, stop token ids, stop strings and max_tokens respected: it ended "
                        "at the first point the rule allows")
    if tokenizer is not None:
        _check_io_binding(tokenizer, receipt, text_rule)
        v.ok("io_binding", "prompt ids re-derived from the request; text = detokenized output")
    elif io_binding:
        raise Reject("io_binding_unavailable", "no tokenizer (the key has none): the prompt and "
                                               "text cannot be bound to the token ids; verify "
                                               "with io_binding=False (--no-io-binding) to "
                                               "accept that")
    else:
        v.unchecked.append("io_binding")
        v.checks.append({"check": "io_binding", "ok": None,
                         "detail": "NOT CHECKED (no tokenizer): the request and text are not "
                                   "bound to the token ids"})
    p = plan(challenge, cfg.num_layers, receipt, window=cfg.sliding_window)
    tokens = receipt["prompt_token_ids"] + receipt["output_token_ids"]
    specs = (array_specs(cfg, prof, key.meta["rows"], p, receipt["trace"]["positions"])
             | embed_specs(cfg, prof, sorted({tokens[t] for t in p.embed})))
    n_pos = len(set(challenge["positions"]))

    def decode(c: Ctx, resid: dict) -> None:
        if p.lm:
            _expect(arrays, "z.lm.pos", p.lm)
            replay_decode(c, resid[cfg.num_layers], p.lm, arrays["z.lm"], tokens, params,
                          len(receipt["prompt_token_ids"]) - 1, receipt["logprobs"],
                          policy.logprobs)
    if not (UNITS and _units(v, key, receipt, arrays, specs, p, cfg, prof, timer, tokens, n_pos,
                             threads, decode)):
        decode(*_in_order(v, key, receipt, arrays, specs, p, cfg, prof, timer, tokens, n_pos,
                          threads))
    lp = "" if policy.logprobs is None else (
        f", and their committed logprobs (top {policy.logprobs}"
        f"{', prompt positions too' if policy.prompt_logprobs else ''}) are the canonical ones")
    v.ok("decode", f"{len(p.lm)} decode steps (the challenged positions that emit a token) "
                   f"reproduce the committed tokens{lp}")


def _in_order(v: Verdict, key, receipt, arrays, specs, p: Plan, cfg, prof, timer, tokens,
              n_pos: int, threads: int):
    """The types, Merkle, embedding and layer checks in the canonical order, the first failure
    raised: the verdict of record (also when _units did not answer). Returns (ctx, resid)."""
    check_types(arrays, specs)  # accumulators packed at the key's widths: decoded per layer
    _passed(v, "types", p, n_pos)
    t_merkle = time.perf_counter()
    resid, kv, proofs = _trace_tables(receipt, arrays, p, cfg)
    ctx = Ctx(key, cfg, prof, RopeTable(cfg, rope_rows), arrays, timer)

    def replay():
        z, zq = _z_tables(arrays, p, matrices(cfg))
        ctx.rope.prefetch([t for l in p.z for t in (*z[l][0], *zq.get(l, ([],))[0])])
        prepare_layers(ctx, sorted(p.z), resid, kv, z, zq)
        _run_units(ctx, sorted(p.z), lambda c, l: replay_layer(c, l, resid, kv, z, zq),
                   threads)
        return z
    # With threads > 1 the layers are replayed while this thread hashes the Merkle proofs (the
    # hashing holds the GIL, the replay's compiled passes do not); the verdict is still the
    # serial one: a failed proof, then the embedding check, then the replay's first failure.
    pending = None
    if threads > 1:
        pool = ThreadPoolExecutor(1, thread_name_prefix="verify-replay")
        pending = pool.submit(replay)
        pool.shutdown(wait=False)
    try:
        _check_proofs(proofs)
    finally:
        timer.merkle = time.perf_counter() - t_merkle
        if pending is not None:
            futures_wait([pending])  # never return (or reject) with the replay still running
    _passed(v, "merkle", p, n_pos)
    _check_embedding(key, arrays, resid[0], [tokens[t] for t in p.embed], p.embed)
    _passed(v, "embedding", p, n_pos)
    if pending is None:
        replay()
    else:
        pending.result()  # re-raises the replay's first failure, after the checks before it
    _passed(v, "layers", p, n_pos)
    return ctx, resid


def _passed(v: Verdict, check: str, p: Plan, n_pos: int) -> None:
    """Record one of the checks _in_order and _units run, with its detail."""
    v.ok(check, {
        "types": lambda: "every opened array has the dtype, shape and range the key implies",
        "merkle": lambda: f"{sum(map(len, p.resid.values()))} residual rows, "
                          f"{sum(map(len, p.kv.values()))} K/V rows proven against the receipt "
                          f"roots",
        "embedding": lambda: f"{len(p.embed)} input rows ({n_pos} challenged positions, "
                             f"{len(p.embed) - n_pos} K/V-sample rows) equal their proven "
                             f"embedding rows",
        "layers": lambda: f"{len(p.z)} layers x {n_pos} challenged positions replayed "
                          f"bit-exactly, and {sum(map(len, p.zq.values()))} K/V-sample rows' "
                          f"Q/K/V (attention over {len(next(iter(p.kv.values()), []))} K/V rows)",
    }[check]())


def _units(v: Verdict, key, receipt, arrays, specs, p: Plan, cfg, prof, timer, tokens,
           n_pos: int, threads: int, decode) -> bool:
    """_in_order's checks and then decode(ctx, resid), a layer at a time: layer l's unit checks
    its K/V values' range, hashes its residual and K/V rows against their proofs and replays it,
    one after the other, while those rows are in cache (in _in_order each pass reads every
    layer's rows from memory again); the units, the embedding check and the decode run on
    `threads` threads. Only an acceptance is taken from here: True when every check passed, with
    the checks up to the layers recorded as _in_order records them; False when anything failed
    or raised (nothing recorded, the timer untouched; the other units stop at their next step),
    and the caller then runs _in_order and the decode, whose first failure is the verdict. So
    the verdict, its reason and the checks listed are _in_order's for every thread count."""
    deferred = {f"kv.{l}.{x}": l for l in p.kv for x in ("k", "v")}
    own = Timer()
    try:
        check_types(arrays, specs, defer_range=frozenset(deferred))
        t0 = time.perf_counter()
        resid, kv, proofs = _trace_tables(receipt, arrays, p, cfg)
        own.merkle += time.perf_counter() - t0
        ctx = Ctx(key, cfg, prof, RopeTable(cfg, rope_rows), arrays, own)
        z, zq = _z_tables(arrays, p, matrices(cfg))
        ctx.rope.prefetch([t for l in p.z for t in (*z[l][0], *zq.get(l, ([],))[0])])
        prepare_layers(ctx, sorted(p.z), resid, kv, z, zq)
        layers = sorted({pr[1] for pr in proofs} | set(p.z))
        by_layer = {l: ([n for n, at in deferred.items() if at == l],
                        [pr for pr in proofs if pr[1] == l]) for l in layers}
        t0 = time.perf_counter()
        ready = {l: _prepare_proofs(*by_layer[l], arrays, specs) for l in layers}
        own.merkle += time.perf_counter() - t0

        failed = threading.Event()  # a unit failed: the others stop at their next step

        def step():
            if failed.is_set():
                raise _Abandoned

        def unit(c: Ctx, l) -> None:
            try:
                step()
                if l == "embedding":
                    return _check_embedding(key, arrays, resid[0],
                                            [tokens[t] for t in p.embed], p.embed)
                if l == "decode":
                    return decode(c, resid)
                ranged, own_proofs = by_layer[l]
                t = time.perf_counter()
                if ready[l] is not None:  # the ranges and proofs in one call per group
                    if not all(native.proof_run(w) for w in ready[l]):
                        raise Reject("merkle", "a proof or range did not pass (decided in order)")
                else:
                    for name in ranged:
                        check_range(name, arrays[name], specs[name])
                    step()
                    _check_proofs(own_proofs)
                c.timer.merkle += time.perf_counter() - t
                step()
                if l in p.z:
                    replay_layer(c, l, resid, kv, z, zq)
            except BaseException:
                failed.set()
                raise
        _run_units(ctx, ["decode", *layers, "embedding"], unit, threads)
    except Exception:  # noqa: BLE001 - not an acceptance: _in_order decides
        return False
    timer.merge(own)
    for check in ("types", "merkle", "embedding", "layers"):
        _passed(v, check, p, n_pos)
    return True


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
# a forked child has none of the parent's pool threads: it starts its own pools
os.register_at_fork(after_in_child=_pools.clear)


def _layer_pool(n: int) -> ThreadPoolExecutor:
    """The process's pool of n layer threads, kept between verifications: the compiled layer
    calls keep their scratch memory per thread (layer.c), which a new thread would map and
    fault in again (at a 70B deep tier some 80 MB per layer: 60 MB in ly_post, 20 in ly_pre)."""
    with _pools_lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix=f"verify-{n}")
        return pool


class _Abandoned(Exception):
    """A unit left undone because another failed (the canonical order decides then)."""


def _run_units(ctx: Ctx, layers: list, unit, threads: int) -> None:
    """unit(ctx, l) for each l (a layer, or a task _units names), in order on this thread, or on
    a pool of `threads` threads, each with its own timer (merged into ctx's after) and its share
    of the cores for the compiled core's row splits; the first exception (in list order) is
    raised after all ran."""
    if threads == 1 or len(layers) < 2:
        for l in layers:
            unit(ctx, l)
        return
    n = min(threads, len(layers))
    inner = max(1, native.threads() // n)

    def one(l):
        c = dataclasses.replace(ctx, timer=Timer())
        try:
            with native.thread_budget(inner):
                unit(c, l)
            return c.timer, None
        except Exception as e:  # noqa: BLE001 - re-raised below, in layer order
            return c.timer, e
    done = list(_layer_pool(n).map(one, layers))
    for t, _ in done:
        ctx.timer.merge(t)
    for _, e in done:
        if e is not None:
            raise e


def _check_manifest(key, receipt) -> None:
    man, km = receipt["manifest"], key.meta
    for k in MANIFEST_KEYS:
        if man.get(k) != km.get(k):
            raise Reject("manifest_mismatch", f"manifest {k} {str(man.get(k))[:16]!r} "
                                              f"!= key {str(km.get(k))[:16]!r}")
    if man.get("profile") != km["profile"]:
        raise Reject("manifest_mismatch", "profile differs from the key's")
    if receipt["trace"]["layers"] != km["config"]["num_hidden_layers"]:
        raise Reject("manifest_mismatch", "trace layer count differs from the model's")
    window = ModelConfig.from_dict(km["config"]).sliding_window
    if man["attention"] != {"window": window}:
        raise Reject("manifest_mismatch", f"attention window {man['attention'].get('window')!r} "
                                          f"is not the model's {window!r}")
    ctx = man["limits"]["context_length"]
    if ctx != km["config"]["max_position_embeddings"]:
        raise Reject("manifest_mismatch", f"context_length {ctx} is not the model's "
                                          f"{km['config']['max_position_embeddings']}")


def _check_opening_meta(meta, receipt, challenge) -> None:
    if not isinstance(meta, dict):
        raise Reject("opening_type", "the opening's metadata is not a JSON object")
    want = {"receipt_id", "challenge_mac"}
    if receipt["manifest"]["seed_commitment"] is not None:
        want |= {"seed", "salt"}
    if set(meta) != want:
        raise Reject("opening_type", f"opening metadata fields {sorted(map(str, meta))[:6]} are "
                                     f"not {sorted(want)}")
    if "seed" in want and not (isinstance(meta["seed"], int) and not isinstance(meta["seed"], bool)
                               and 0 <= meta["seed"] < 2**64 and isinstance(meta["salt"], str)
                               and re.fullmatch(r"[0-9a-f]{32}", meta["salt"]) is not None):
        raise Reject("opening_type", "seed must be an unsigned 64-bit integer, salt 16 bytes "
                                     "as 32 lowercase hex digits")
    if not hmac.compare_digest(str(meta.get("receipt_id")).encode(), receipt["receipt_id"].encode()):
        raise Reject("opening_mismatch", "opening is for another receipt")
    if not hmac.compare_digest(str(meta.get("challenge_mac")).encode(), challenge["mac"].encode()):
        raise Reject("opening_mismatch", "opening answers another challenge")


def _sampling(receipt, meta) -> SamplingParams:
    man = receipt["manifest"]
    s = man.get("sampling") or {}
    try:
        temp, top_k, top_p = s["temperature"], s["top_k"], s["top_p"]
        if man.get("seed_commitment") is None:
            if temp != 0:
                raise Reject("seed_commitment", "sampled receipt without a seed commitment")
            return SamplingParams(temp, top_k, top_p, 0)
        seed, salt = meta.get("seed"), bytes.fromhex(str(meta.get("salt")))
        params = SamplingParams(temp, top_k, top_p, seed, nonce=receipt["nonce"])
    except (KeyError, ValueError) as e:
        raise Reject("manifest_mismatch", f"sampling parameters unusable ({e})") from None
    if params.greedy:
        raise Reject("seed_commitment", "greedy receipt carries a seed commitment")
    if not hmac.compare_digest(seed_commitment(seed, salt).encode(), man["seed_commitment"].encode()):
        raise Reject("seed_commitment", "revealed seed does not match the committed one")
    return params


def _check_client_request(receipt, request, params: SamplingParams, endpoint) -> None:
    try:
        req = request_mod.parse(request, endpoint=endpoint)
    except request_mod.RequestError as e:
        raise Reject("request_invalid", f"the client's request: {e}") from None
    why = request_mod.mismatch(req, receipt, params)
    if why is not None:
        raise Reject("request_mismatch", why)


def _check_stop_policy(receipt, key, policy: OutputPolicy, tokenizer) -> str | None:
    """The stop rule (verifier/outputs.py) over the receipt's tokens; returns the text the rule
    returns (stop strings cut), or None without a tokenizer (then no stop strings are allowed:
    they cannot be checked)."""
    lim, out = receipt["manifest"]["limits"], receipt["output_token_ids"]
    eos = set(lim["eos_token_ids"])
    tok = key.meta.get("tokenizer")
    if tok is not None:  # the stop set is the model's, not the provider's choice
        want = set(tok["eos_token_ids"]) | set(_config_eos(key.meta["config"]))
        if eos != want:
            raise Reject("stop_policy", f"EOS set {sorted(eos)} is not the model's {sorted(want)}")
    if len(out) > lim["max_tokens"]:
        raise Reject("stop_policy", f"{len(out)} tokens exceed max_tokens {lim['max_tokens']}")
    enders = eos | set(policy.stop_token_ids)
    if any(t in enders for t in out[:-1]):
        raise Reject("stop_policy", "generation continued past an EOS or stop token")
    if not policy.stop:
        if out[-1] not in enders and len(out) != lim["max_tokens"]:
            raise Reject("stop_policy", "generation stopped early without EOS or a stop token")
        return tokenizer.decode(out) if tokenizer is not None else None
    if tokenizer is None:
        raise Reject("stop_policy", "stop strings cannot be checked without the key's tokenizer")
    scan = StopScan(tokenizer, policy, eos, lim["max_tokens"])
    for i, t in enumerate(out):
        if scan.push(t) and i < len(out) - 1:
            raise Reject("stop_policy", f"generation continued past a stop string (it occurs "
                                        f"after output token {i + 1} of {len(out)})")
    if scan.cut is None and out[-1] not in enders and len(out) != lim["max_tokens"]:
        raise Reject("stop_policy", "generation stopped early: no EOS, stop token or stop "
                                    "string, and max_tokens not reached")
    return scan.final_text()


def _config_eos(cfg: dict) -> list[int]:
    e = cfg.get("eos_token_id")
    return [] if e is None else (list(e) if isinstance(e, list) else [e])


def _check_io_binding(tok, receipt, text: str) -> None:
    req = receipt["request"]
    if ("messages" in req) == ("prompt" in req):
        raise Reject("prompt_binding", "request has not exactly one of 'prompt' and 'messages'")
    msgs = req.get("messages")
    if msgs is not None and not (isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs)):
        raise Reject("prompt_binding", "messages must be objects with string role and content")
    if "messages" in req:
        ids = tok.encode_chat(req["messages"])
    elif isinstance(req["prompt"], str):  # a plain completion: no chat template, whatever the
        ids = tok.encode(req["prompt"])  # provider's manifest says (the request's shape decides)
    elif isinstance(req["prompt"], list) and req["prompt"] and all(
            type(t) is int for t in req["prompt"]):
        ids = req["prompt"]  # the client's own token ids
    else:
        raise Reject("prompt_binding", "the request's prompt is neither a string nor token ids")
    if ids != receipt["prompt_token_ids"]:
        raise Reject("prompt_binding", "prompt token ids are not the tokenization of the request")
    if not hmac.compare_digest(text.encode(), receipt["text"].encode()):
        raise Reject("output_binding", "text is not the detokenization of the output ids (cut "
                                       "before the first stop string, when one ended it)")


def _expect(arrays, name, positions) -> None:
    got = arrays.get(name)
    if got is None or got.dtype != np.int64 or got.tolist() != list(positions):
        raise Reject("opening_malformed", f"{name}: missing or not the challenged positions")


def _proof(arrays, name) -> list[bytes]:
    return [bytes(r) for r in _proof_rows(arrays, name)]


def _proof_rows(arrays, name) -> np.ndarray:
    """A proof's hashes as the opening holds them, uint8 [k, 32] (what the compiled walk reads:
    no list of bytes objects made and joined again)."""
    a = arrays[name]
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != 32:
        raise Reject("opening_malformed", f"{name}: not a list of 32-byte hashes")
    return a


def _trace_tables(receipt, arrays, p: Plan, cfg):
    """The opened residual and K/V rows as tables, after the structural checks (layer roots
    against the receipt, shapes, dtypes, proof lists), and the Merkle proofs still to check, in
    order (residual layers, then K/V layers). Called after check_types with the plan's specs
    (both callers), which has found every position array int64 and equal to the plan's and every
    residual row finite: the tables take aligned copies of the opening's position arrays (the
    container's may lie at any offset)."""
    L = cfg.num_layers
    rl, kl = _proof(arrays, "resid.layer_roots"), _proof(arrays, "kv.layer_roots")
    if len(rl) != L + 1 or len(kl) != L:
        raise Reject("opening_malformed", "wrong number of layer roots")
    n = receipt["trace"]["positions"]
    if not (layer_roots_match(b"resid", rl, bytes.fromhex(receipt["trace"]["residual_root"]))
            and layer_roots_match(b"kv", kl, bytes.fromhex(receipt["trace"]["kv_root"]))):
        raise Reject("trace_root", "layer roots do not hash to the receipt's trace roots")
    resid, kv, proofs = {}, {}, []
    for l, pos in p.resid.items():
        at = np.array(arrays[f"resid.{l}.pos"], dtype=np.int64)
        rows = arrays[f"resid.{l}.rows"]
        if rows.dtype != np.float32 or rows.shape != (len(pos), cfg.hidden_size):
            raise Reject("opening_malformed", f"resid.{l}.rows has the wrong shape or dtype")
        proofs.append((b"resid", l, at, [rows],
                       _proof_rows(arrays, f"resid.{l}.proof"), rl[l], n,
                       "merkle_residual", f"residual rows of layer {l} are not the committed "
                                          f"ones"))
        resid[l] = RowTable(pos, rows)
    shape = (cfg.num_kv_heads, cfg.head_dim)
    for l, pos in p.kv.items():
        at = np.array(arrays[f"kv.{l}.pos"], dtype=np.int64)
        k, sk, v, sv = (arrays[f"kv.{l}.{x}"] for x in ("k", "sk", "v", "sv"))
        if (k.shape != (len(pos), *shape) or v.shape != k.shape or k.dtype != v.dtype
                or sk.shape != (len(pos), shape[0]) or sv.shape != sk.shape
                or sk.dtype != np.float32 or sv.dtype != np.float32 or k.dtype.kind != "i"):
            raise Reject("opening_malformed", f"kv.{l}: wrong shapes or dtypes")
        proofs.append((b"kv", l, at, [k, sk, v, sv], _proof_rows(arrays, f"kv.{l}.proof"), kl[l],
                       n, "merkle_kv", f"K/V rows of layer {l} are not the committed ones"))
        kv[l] = (at, k, sk, v, sv)
    return resid, kv, proofs


def _prepare_proofs(ranged: list[str], proofs: list, arrays, specs) -> list | None:
    """A unit's proof groups prepared as one compiled call each (commitment.prepare_proof),
    its deferred K/V range checks folded into its K/V group; None when any group or range
    cannot be taken so (the unit then runs check_range and _check_proofs)."""
    out, left = [], set(ranged)
    for kind, l, pos, rows, proof, root, n, _code, _detail in proofs:
        ranges = None
        if kind == b"kv":
            names = [f"kv.{l}.{x}" for x in ("k", "sk", "v", "sv")]
            # check_range's test: none where the spec has no range
            ranges = [(specs[m].lo, specs[m].hi) if m in left and specs[m].lo is not None
                      else None for m in names]
            left -= set(names)
        w = prepare_proof(kind, l, pos, rows, proof, root, n, ranges)
        if w is None:
            return None
        out.append(w)
    return None if left else out


def _check_proofs(proofs) -> None:
    """Each proof in order; the first that fails rejects."""
    for kind, l, pos, rows, proof, root, n, code, detail in proofs:  # pos: the plan's, int64
        if not verify_multiproof_rows(pos, leaf_digests(kind, l, pos, rows), n, proof, root):
            raise Reject(code, detail)


def _check_embedding(key, arrays, x0: dict, ids: list[int], positions: list[int]) -> None:
    uniq = sorted(set(ids))
    _expect(arrays, "embed.ids", uniq)
    q, s = arrays["embed.q"], arrays["embed.s"]
    if q.shape[0] != len(uniq) or s.shape != (len(uniq),) or s.dtype != np.float32:
        raise Reject("opening_malformed", "embedding rows have the wrong shape")
    leaves = {t: embed_leaf(t, q[i], s[i]) for i, t in enumerate(uniq)}
    n_vocab = key.meta["config"]["vocab_size"]
    if not verify_multiproof(leaves, n_vocab, _proof(arrays, "embed.proof"),
                             bytes.fromhex(key.meta["embed_root"])):
        raise Reject("merkle_embedding", "embedding rows are not the committed model's")
    row = {t: i for i, t in enumerate(uniq)}
    for t, pos in zip(ids, positions):
        want = (q[row[t]].astype(np.float32) * s[row[t]]).astype(np.float32)
        if not np.array_equal(x0[pos], want):
            raise Reject("embedding", f"position {pos}: input residual is not token {t}'s embedding")


def _z_tables(arrays, p: Plan, names):
    z, zq = {}, {}
    for l, pos in p.z.items():
        _expect(arrays, f"z.{l}.pos", pos)
        rows = {m: arrays[f"z.{l}.{m}"] for m in names}  # packed; replay_layer decodes them
        if any(r.dtype != np.uint8 or r.shape[0] != len(pos) for r in rows.values()):
            raise Reject("opening_malformed", f"z.{l}: accumulators of the wrong type or count")
        z[l] = (pos, rows)
        if p.zq.get(l):
            _expect(arrays, f"zq.{l}.pos", p.zq[l])
            zq[l] = (p.zq[l], arrays[f"zq.{l}.qkv"])
            if zq[l][1].dtype != np.uint8 or zq[l][1].shape[0] != len(p.zq[l]):
                raise Reject("opening_malformed", f"zq.{l}: wrong accumulators")
    return z, zq

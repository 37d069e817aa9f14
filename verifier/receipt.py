"""Receipts: the JSON a provider returns with every response, and its hashes.

Schema (docs/PROTOCOL.md): version, manifest (+ hash), request (+ hash), nonce, prompt and output
token ids, text, IO hash chain, trace roots, receipt_id = blake3 over everything else.
"""

from __future__ import annotations

import hmac
import re
import struct

import blake3

from .commitment import canonical_json
from .outputs import policy_error
from .request import RequestError, check_text
from .safejson import uint_ids

RECEIPT_VERSION = "commitllm-receipt/3"  # 3: manifest `output` (stop, logprobs, echo) and the
# committed `logprobs`; 2: no manifest `chat` flag (the request says)
MAX_RECEIPT_BYTES = 64 * 1024 * 1024
_D = {k: f"commitllm/{k}/v1\x00".encode()
      for k in ("manifest", "request", "io", "receipt", "seed")}


def h(kind: str, data: bytes) -> str:
    return blake3.blake3(_D[kind] + data).hexdigest()


def manifest_hash(manifest: dict) -> str:
    return h("manifest", canonical_json(manifest))


def request_hash(request: dict) -> str:
    return h("request", canonical_json(request))


def seed_commitment(seed: int, salt: bytes) -> str:
    return h("seed", struct.pack("<Q", seed) + salt)


def io_chain(manifest_h: str, request_h: str, nonce: str, prompt_ids, output_ids) -> str:
    """h_0 = H(manifest_hash || request_hash || nonce); then one link per token, prompt first."""
    cur = blake3.blake3(_D["io"] + bytes.fromhex(manifest_h) + bytes.fromhex(request_h)
                        + nonce.encode()).digest()
    ids = [*prompt_ids, *output_ids]
    core = _chain_core(ids)
    if core is not None:  # the same links in the compiled core (hash.c b3_chain)
        try:
            return core.b3_chain(_D["io"], cur, b"p" * len(prompt_ids) + b"o" * len(output_ids),
                                 ids).hex()
        except ValueError:  # ids it does not take (not plain ints below 2^32): the Python links
            pass
    for tag, ids in ((b"p", prompt_ids), (b"o", output_ids)):
        for t in ids:
            cur = blake3.blake3(_D["io"] + cur + tag + struct.pack("<I", t)).digest()
    return cur.hex()


CHAIN_NATIVE_MIN = 32  # links from which the compiled core computes the IO chain


def _chain_core(ids: list):
    """The compiled core for an IO chain of at least CHAIN_NATIVE_MIN links, else None (the
    Python links). native.b3_chain refuses ids other than plain ints below 2^32 (ValueError);
    io_chain then takes the Python links, which raise on bad ids as they always did."""
    if len(ids) < CHAIN_NATIVE_MIN:
        return None
    from . import native

    return native if native.lib() is not None else None


def receipt_id(body: dict) -> str:
    return h("receipt", canonical_json({k: v for k, v in body.items() if k != "receipt_id"}))


def build_receipt(manifest: dict, request: dict, nonce: str, prompt_ids: list[int],
                  output_ids: list[int], text: str, trace: dict,
                  logprobs: dict | None = None) -> dict:
    mh, rh = manifest_hash(manifest), request_hash(request)
    body = {
        "version": RECEIPT_VERSION, "manifest": manifest, "manifest_hash": mh,
        "request": request, "request_hash": rh, "nonce": nonce,
        "prompt_token_ids": list(prompt_ids), "output_token_ids": list(output_ids), "text": text,
        "io_chain": io_chain(mh, rh, nonce, prompt_ids, output_ids), "trace": trace,
        "logprobs": logprobs,
    }
    body["receipt_id"] = receipt_id(body)
    return body


RECEIPT_BYTES_FIXED = 64 * 1024  # manifest, hashes, trace, field names
RECEIPT_BYTES_PER_POSITION = 2048  # a token id, its share of the request and text, JSON-escaped


def receipt_bound(context_length: int) -> int:
    """The largest receipt file an honest provider can send for a model of this context length
    (every position's id, request and text share at most 2 KiB), capped at MAX_RECEIPT_BYTES:
    readers refuse a larger file before parsing it."""
    return min(MAX_RECEIPT_BYTES, RECEIPT_BYTES_FIXED + RECEIPT_BYTES_PER_POSITION * context_length)


class ReceiptError(ValueError):
    """A receipt that is malformed (code 'receipt_malformed') or inconsistent (code given)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


_FIELDS = {"version": str, "manifest": dict, "manifest_hash": str, "request": dict,
           "request_hash": str, "nonce": str, "prompt_token_ids": list, "output_token_ids": list,
           "text": str, "io_chain": str, "trace": dict, "receipt_id": str,
           "logprobs": (dict, type(None))}
_TRACE = {"positions": int, "layers": int, "residual_root": str, "kv_root": str}


def check_receipt(r, *, vocab_size: int | None = None, max_positions: int | None = None) -> None:
    """Structure, types and internal hashes; raises ReceiptError with a reason code.
    vocab_size / max_positions (the key's model): every token id must lie below vocab_size
    (code token_range) and prompt + output fit in max_positions (code context_length), checked
    before any hash is computed over them."""
    _shape(r)
    check_logprobs(r, vocab_size)
    n_tok = len(r["prompt_token_ids"]) + len(r["output_token_ids"])
    if max_positions is not None and n_tok > max_positions:
        raise ReceiptError("context_length", f"{n_tok} prompt + output tokens exceed the "
                                             f"model's context of {max_positions}")
    if vocab_size is not None:
        bad = [t for t in (*r["prompt_token_ids"], *r["output_token_ids"]) if t >= vocab_size]
        if bad:
            raise ReceiptError("token_range", f"token id {bad[0]} is not below the vocabulary "
                                              f"size {vocab_size}")
        if any(t >= vocab_size for t in r["manifest"]["limits"]["eos_token_ids"]):
            raise ReceiptError("token_range", "an EOS id is not below the vocabulary size")
    pairs = (("receipt_hash", r["manifest_hash"], manifest_hash(r["manifest"])),
             ("receipt_hash", r["request_hash"], request_hash(r["request"])),
             ("io_chain", r["io_chain"], io_chain(r["manifest_hash"], r["request_hash"], r["nonce"],
                                                  r["prompt_token_ids"], r["output_token_ids"])),
             ("receipt_hash", r["receipt_id"], receipt_id(r)))
    for code, got, want in pairs:
        if not hmac.compare_digest(got.encode(), want.encode()):
            raise ReceiptError(code, f"{code}: stored {got[:16]}... != recomputed {want[:16]}...")
    n = len(r["prompt_token_ids"]) + len(r["output_token_ids"]) - 1
    if r["trace"]["positions"] != n:
        raise ReceiptError("token_count", f"trace covers {r['trace']['positions']} positions, "
                                          f"tokens imply {n}")


MAX_NONCE_CHARS = 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _exact_keys(d: dict, want, where: str) -> None:
    if set(d) != set(want):
        extra = sorted(str(k)[:32] for k in set(d) - set(want))
        missing = sorted(set(want) - set(d))
        raise ReceiptError("receipt_malformed", f"{where}: unknown fields {extra[:4]}, missing "
                                                f"{missing[:4]}")


# The manifest's fields and their JSON types: anything else is refused (fail closed).
_MANIFEST = {"spec_version": str, "numerics_digest": str, "profile": dict, "model_commitment": str,
             "rope_digest": str, "tokenizer_hash": (str, type(None)),
             "chat_template_hash": (str, type(None)), "sampling": dict,
             "seed_commitment": (str, type(None)), "limits": dict, "output": dict,
             "attention": dict}
_PROFILE = {"name": str, "weight_qmax": int, "act_qmax": int, "kv_qmax": int, "head_qmax": int}
_LIMITS = ("max_tokens", "eos_token_ids", "context_length")
_SAMPLING = ("temperature", "top_k", "top_p")
F32_TINY = 2.0 ** -126  # the smallest positive normal fp32
F32_MAX = 3.4028234663852886e38


def check_sampling(s) -> None:
    """The decode policy's domain (code sampling_invalid): temperature 0 (greedy) or a number
    whose fp32 value is a positive normal; top_k an integer in [0, 2^31); top_p a number in
    (0, 1]. Every one a JSON number, never a bool (Python's True is an int)."""
    bad = lambda msg: ReceiptError("sampling_invalid", msg)  # noqa: E731
    if not isinstance(s, dict):
        raise bad("sampling is not an object")
    _exact_keys(s, _SAMPLING, "manifest.sampling")
    t, k, p = s["temperature"], s["top_k"], s["top_p"]
    if not _is_num(t) or not (t == 0 or F32_TINY <= t <= F32_MAX):
        raise bad(f"temperature {t!r} is neither 0 nor a positive normal fp32 value")
    if not _is_int(k) or not 0 <= k < 2**31:
        raise bad(f"top_k {k!r} is not an integer in [0, 2^31)")
    if not _is_num(p) or not 0 < p <= 1:
        raise bad(f"top_p {p!r} is not a number in (0, 1]")


def _manifest(m) -> None:
    bad = lambda msg: ReceiptError("receipt_malformed", msg)  # noqa: E731
    _exact_keys(m, _MANIFEST, "manifest")
    for k, t in _MANIFEST.items():
        if not isinstance(m[k], t):
            raise bad(f"manifest field {k!r} has the wrong JSON type")
    _exact_keys(m["profile"], _PROFILE, "manifest.profile")
    if not all(isinstance(m["profile"][k], t) and not isinstance(m["profile"][k], bool)
               for k, t in _PROFILE.items()):
        raise bad("manifest.profile: wrong JSON types")
    if m["seed_commitment"] is not None and not _HEX64.fullmatch(m["seed_commitment"]):
        raise bad("seed_commitment is not a 32-byte hex digest")
    lim = m["limits"]
    _exact_keys(lim, _LIMITS, "manifest.limits")
    if not _is_int(lim["max_tokens"]) or not _is_int(lim["context_length"]):
        raise bad("limits max_tokens and context_length must be integers")
    eos = lim["eos_token_ids"]
    if not (isinstance(eos, list) and all(_is_int(t) and 0 <= t < 2**32 for t in eos)
            and len(set(eos)) == len(eos)):
        raise bad("limits eos_token_ids must be a list of distinct token ids")
    _exact_keys(m["attention"], ("window",), "manifest.attention")
    w = m["attention"]["window"]
    if w is not None and not (_is_int(w) and 0 < w < 2**31):
        raise bad("attention window must be null or an integer in [1, 2^31)")
    check_sampling(m["sampling"])
    problem = policy_error(m["output"])
    if problem:
        raise bad(f"manifest.output: {problem}")


def _is_lp(x) -> bool:
    return isinstance(x, float) and -1e300 < x <= 0.0


def _lp_entries(xs, n: int, top: int, where: str) -> None:
    """n entries [logprob, [[id, logprob] x top]]: types and counts (values: the verifier's
    replay at challenged positions)."""
    bad = lambda msg: ReceiptError("receipt_malformed", f"logprobs.{where}: {msg}")  # noqa: E731
    if not isinstance(xs, list) or len(xs) != n:
        raise bad(f"not a list of {n} entries")
    for e in xs:
        if not (isinstance(e, list) and len(e) == 2 and _is_lp(e[0]) and isinstance(e[1], list)
                and len(e[1]) == top):
            raise bad(f"an entry is not [logprob, [{top} x [id, logprob]]]")
        for t in e[1]:
            if not (isinstance(t, list) and len(t) == 2 and _is_int(t[0]) and 0 <= t[0] < 2**32
                    and _is_lp(t[1])):
                raise bad("a top entry is not [token id, logprob]")


def check_logprobs(r, vocab_size: int | None = None) -> None:
    """The committed logprobs have the shape the manifest's output policy asks: null when off;
    else {prompt: null or one entry per prompt token after the first (echo), output: one entry
    per output token}, each with min(k, vocab) top entries."""
    lp, k = r["logprobs"], r["manifest"]["output"]["logprobs"]
    if k is None:
        if lp is not None:
            raise ReceiptError("receipt_malformed", "logprobs committed that were not asked for")
        return
    if not isinstance(lp, dict) or set(lp) != {"prompt", "output"}:
        raise ReceiptError("receipt_malformed", "logprobs must be {prompt, output}")
    top = k if vocab_size is None else min(k, vocab_size)
    if r["manifest"]["output"]["echo"]:
        _lp_entries(lp["prompt"], len(r["prompt_token_ids"]) - 1, top, "prompt")
    elif lp["prompt"] is not None:
        raise ReceiptError("receipt_malformed", "prompt logprobs without echo")
    _lp_entries(lp["output"], len(r["output_token_ids"]), top, "output")


def _shape(r) -> None:
    bad = lambda msg: ReceiptError("receipt_malformed", msg)  # noqa: E731
    if not isinstance(r, dict):
        raise bad("receipt is not a JSON object")
    _exact_keys(r, _FIELDS, "receipt")
    for k, t in _FIELDS.items():
        if not isinstance(r.get(k), t):
            raise bad(f"field {k!r} missing or of the wrong JSON type")
    if r["version"] != RECEIPT_VERSION:
        raise bad(f"unsupported receipt version {r['version']!r}")
    _exact_keys(r["trace"], _TRACE, "trace")
    for k, t in _TRACE.items():
        if not isinstance(r["trace"].get(k), t) or isinstance(r["trace"].get(k), bool):
            raise bad(f"trace field {k!r} missing or not a {t.__name__}")
    if len(r["nonce"]) > MAX_NONCE_CHARS:
        raise bad(f"nonce longer than {MAX_NONCE_CHARS} characters")
    for k in ("nonce", "text", "request"):  # every string, the request's nested ones too
        try:
            check_text(r[k], k)
        except RequestError as e:
            raise bad(str(e)) from None
    _manifest(r["manifest"])
    for k in ("prompt_token_ids", "output_token_ids"):
        ids = r[k]
        if not uint_ids(ids):  # plain ints (not bools) in [0, 2^32)
            raise bad(f"{k} must be a list of token ids")
    if not r["prompt_token_ids"] or not r["output_token_ids"]:
        raise bad("a receipt needs a prompt and at least one output token")
    for k in ("manifest_hash", "request_hash", "io_chain", "receipt_id"):
        if len(r[k]) != 64 or any(c not in "0123456789abcdef" for c in r[k]):
            raise bad(f"{k} is not a 32-byte hex digest")
    for k in ("residual_root", "kv_root"):
        v = r["trace"][k]
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise bad(f"trace {k} is not a 32-byte hex digest")

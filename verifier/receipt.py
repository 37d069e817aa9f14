"""Receipts: the JSON a provider returns with every response, and its hashes.

Schema (docs/PROTOCOL.md): version, manifest (+ hash), request (+ hash), nonce, prompt and output
token ids, text, IO hash chain, trace roots, receipt_id = blake3 over everything else.
"""

from __future__ import annotations

import hmac
import struct

import blake3

from .commitment import canonical_json

RECEIPT_VERSION = "commitllm-receipt/2"  # 2: no manifest `chat` flag (the request says)
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
    for tag, ids in ((b"p", prompt_ids), (b"o", output_ids)):
        for t in ids:
            cur = blake3.blake3(_D["io"] + cur + tag + struct.pack("<I", t)).digest()
    return cur.hex()


def receipt_id(body: dict) -> str:
    return h("receipt", canonical_json({k: v for k, v in body.items() if k != "receipt_id"}))


def build_receipt(manifest: dict, request: dict, nonce: str, prompt_ids: list[int],
                  output_ids: list[int], text: str, trace: dict) -> dict:
    mh, rh = manifest_hash(manifest), request_hash(request)
    body = {
        "version": RECEIPT_VERSION, "manifest": manifest, "manifest_hash": mh,
        "request": request, "request_hash": rh, "nonce": nonce,
        "prompt_token_ids": list(prompt_ids), "output_token_ids": list(output_ids), "text": text,
        "io_chain": io_chain(mh, rh, nonce, prompt_ids, output_ids), "trace": trace,
    }
    body["receipt_id"] = receipt_id(body)
    return body


class ReceiptError(ValueError):
    """A receipt that is malformed (code 'receipt_malformed') or inconsistent (code given)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


_FIELDS = {"version": str, "manifest": dict, "manifest_hash": str, "request": dict,
           "request_hash": str, "nonce": str, "prompt_token_ids": list, "output_token_ids": list,
           "text": str, "io_chain": str, "trace": dict, "receipt_id": str}
_TRACE = {"positions": int, "layers": int, "residual_root": str, "kv_root": str}


def check_receipt(r) -> None:
    """Structure and internal hashes; raises ReceiptError with a reason code."""
    _shape(r)
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


def _shape(r) -> None:
    bad = lambda msg: ReceiptError("receipt_malformed", msg)  # noqa: E731
    if not isinstance(r, dict):
        raise bad("receipt is not a JSON object")
    for k, t in _FIELDS.items():
        if not isinstance(r.get(k), t):
            raise bad(f"field {k!r} missing or not a {t.__name__}")
    if r["version"] != RECEIPT_VERSION:
        raise bad(f"unsupported receipt version {r['version']!r}")
    for k, t in _TRACE.items():
        if not isinstance(r["trace"].get(k), t) or isinstance(r["trace"].get(k), bool):
            raise bad(f"trace field {k!r} missing or not a {t.__name__}")
    for k in ("prompt_token_ids", "output_token_ids"):
        ids = r[k]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 for i in ids):
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

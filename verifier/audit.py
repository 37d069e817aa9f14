"""`commitllm audit`: challenge a sample of receipts against a live server and verify the openings.

HTTP through urllib (standard library): the verifier side needs no new dependency. The server
never sees the key; it gets a MAC'd challenge and answers with an opening, which is size-checked
before it is read and verified here exactly like `commitllm verify`."""

from __future__ import annotations

import json
import math
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import challenge as challenge_mod
from . import container
from .opening import OPENING_MAGIC, OPENING_VERSION
from .receipt import MAX_RECEIPT_BYTES, ReceiptError, check_receipt
from .verify import Verdict, verify

MAX_LIST_BYTES = 256 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024


class AuditError(Exception):
    """Cannot audit at all (unreadable receipts, unreachable server): exit 2, one line."""


@dataclass
class Item:
    receipt: dict
    request: dict | None  # the request as the client sent it, when it saved it
    source: str


@dataclass
class Row:
    item: Item
    verdict: Verdict
    positions: int = 0
    opening_bytes: int = 0


# --- receipts -----------------------------------------------------------------------------------

def load_items(path: Path) -> list[Item]:
    """Receipts saved by a client: a JSON file or a folder of them (*.json). Each file holds a
    receipt, a response carrying one ({"receipt": ...}), {"request": ..., "response": ...} or
    {"request": ..., "receipt": ...}, or a list of those."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise AuditError(f"{path}: no *.json receipts")
    items = []
    for f in files:
        try:
            if f.stat().st_size > MAX_RECEIPT_BYTES:
                raise AuditError(f"{f}: larger than {MAX_RECEIPT_BYTES} bytes")
            obj = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise AuditError(f"{f}: cannot read ({e})") from None
        items += _items(obj, f.name)
    return items


def _items(obj, source: str) -> list[Item]:
    if isinstance(obj, list):
        return [it for i, o in enumerate(obj) for it in _items(o, f"{source}[{i}]")]
    if not isinstance(obj, dict):
        raise AuditError(f"{source}: not a receipt, a response or a list of them")
    request = obj.get("request") if isinstance(obj.get("request"), dict) else None
    if isinstance(obj.get("response"), dict):
        obj = obj["response"]
    if isinstance(obj.get("receipt"), dict):
        return [Item(obj["receipt"], request, source)]
    if "receipt_id" in obj:
        return [Item(obj, None, source)]
    raise AuditError(f"{source}: no receipt in it")


def server_items(server: str, limit: int, timeout: float, api_key: str | None = None) -> list[Item]:
    data = http(f"{server}/v1/receipts?limit={limit}", None, MAX_LIST_BYTES, timeout, api_key)
    try:
        listed = json.loads(data)["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise AuditError(f"{server}/v1/receipts: not a receipt list ({e})") from None
    if not isinstance(listed, list):
        raise AuditError(f"{server}/v1/receipts: not a receipt list")
    return [Item(r, None, "server") for r in listed]


def sample(items: list[Item], rate: float, rng: random.Random | None = None) -> list[Item]:
    """ceil(rate * n) of the items (at least one), drawn by the auditor, not the server."""
    if not 0 < rate <= 1:
        raise AuditError(f"--rate must be in (0, 1], got {rate}")
    k = max(1, math.ceil(rate * len(items))) if items else 0
    return (rng or random.SystemRandom()).sample(items, k)


# --- HTTP ---------------------------------------------------------------------------------------

def http(url: str, body: bytes | None, limit: int, timeout: float,
         api_key: str | None = None) -> bytes:
    """GET (body None) or POST JSON; the reply is refused before reading when over `limit`.
    api_key: sent as `Authorization: Bearer KEY` (servers started with --api-key)."""
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return _read(resp, limit, url)
    except urllib.error.HTTPError as e:
        raise ServerRefused(e.code, _error_message(e)) from None
    except (urllib.error.URLError, OSError) as e:
        raise AuditError(f"{url}: unreachable ({getattr(e, 'reason', e)})") from None


class ServerRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _read(resp, limit: int, url: str) -> bytes:
    n = resp.headers.get("Content-Length")
    if n is not None and (not n.isdigit() or int(n) > limit):
        raise ServerRefused(0, f"{url}: reply of {n} bytes exceeds the {limit}-byte limit")
    data = resp.read(limit + 1)
    if len(data) > limit:
        raise ServerRefused(0, f"{url}: reply exceeds the {limit}-byte limit")
    return data


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read(MAX_ERROR_BYTES))["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return str(e.reason)


# --- audit --------------------------------------------------------------------------------------

def audit_item(key, tokenizer, server: str, item: Item, tier: str, max_opening: int,
               timeout: float, api_key: str | None = None) -> Row:
    """Challenge one receipt, fetch its opening, verify it. Never raises for the server's faults:
    they reject. A refused API key (401) is the auditor's problem, not a rejection: AuditError."""
    r = item.receipt
    try:
        check_receipt(r)
    except ReceiptError as e:
        return Row(item, _reject(e.code, str(e)))
    c = challenge_mod.derive(key.secret, r, tier)
    try:
        data = http(f"{server}/v1/audit", json.dumps(c).encode(), max_opening, timeout, api_key)
        meta, arrays = container.loads(data, OPENING_MAGIC, OPENING_VERSION, max_opening)
    except ServerRefused as e:
        if e.status == 401:
            raise AuditError(f"{server}/v1/audit: {e} (give the server's key: --api-key or "
                             "COMMITLLM_API_KEY)") from None
        return Row(item, _reject("opening_unavailable", str(e)), len(c["positions"]))
    except container.ContainerError as e:
        return Row(item, _reject("opening_malformed", str(e)), len(c["positions"]), len(data))
    nonce = item.request.get("nonce") if item.request else None
    v = verify(key, r, c, meta, arrays, tokenizer, expected_nonce=nonce,
               expected_request=item.request)
    return Row(item, v, len(c["positions"]), len(data))


def _reject(code: str, detail: str) -> Verdict:
    v = Verdict(accepted=False, reason=code, detail=detail)
    v.checks.append({"check": code, "ok": False, "detail": detail})
    return v

"""`commitllm audit`: challenge a sample of receipts against a live server and verify the openings.

The server never sees the key; it gets a MAC'd challenge and answers with an opening, verified
here exactly like `commitllm verify`. Bounded against a hostile server or receipt set:

* the receipts it samples from are capped (max_items) and read one file at a time, twice (count,
  then load the sampled ones), so memory is one file's parse, not the whole set's;
* every HTTP exchange has a wall-clock deadline and a size limit (verifier/httpclient.py), and
  every server answer is parsed with safejson;
* every sampled receipt gets its own row: a receipt, a saved exchange or an opening that cannot
  be read is a REJECTED row for that receipt, and the audit goes on.
Only a refused audit credential (401/403) stops it: no opening could be fetched at all."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import challenge as challenge_mod
from . import container, httpclient, safejson
from .client import Exchange, ExchangeError, from_saved
from .opening import OPENING_MAGIC, OPENING_UPGRADE, OPENING_VERSION
from .receipt import MAX_RECEIPT_BYTES, ReceiptError, check_receipt
from .verify import Verdict, verify

MAX_LIST_BYTES = 64 * 1024 * 1024  # GET /v1/receipts: at most 1000 receipts
MAX_ITEMS = 10_000  # receipts an audit samples from (default of --max-receipts)


class AuditError(Exception):
    """Cannot audit at all (no receipts, too many, refused credential): exit 2, one line."""


@dataclass(frozen=True)
class Source:
    """Where one saved receipt is: a file, and its index when the file holds a list."""

    path: Path | None
    index: int | None
    label: str


@dataclass
class Item:
    source: str
    exchange: Exchange | None = None
    error: tuple[str, str] | None = None  # (reason code, detail) when it cannot be read


@dataclass
class Row:
    """One receipt's line of the report (no receipt kept: rows of a large audit stay small)."""

    receipt_id: str | None
    source: str
    tokens: int
    verdict: Verdict
    positions: int = 0
    opening_bytes: int = 0

    @property
    def request_checked(self) -> bool:
        return any(c["check"] == "request" and c["ok"] for c in self.verdict.checks)

    @property
    def text_checked(self) -> bool:
        return any(c["check"] == "text" and c["ok"] for c in self.verdict.checks)


# --- receipts -----------------------------------------------------------------------------------

def list_sources(path: Path, max_items: int = MAX_ITEMS) -> list[Source]:
    """Every saved receipt under PATH (a JSON file or a folder of *.json), counted without
    keeping any: a file holds an exchange, a response, a receipt or a list of them. A file that
    cannot be read counts as one (it becomes a REJECTED row)."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise AuditError(f"{path}: no *.json receipts")
    if len(files) > max_items:
        raise AuditError(f"{path}: {len(files)} files, more than the {max_items} receipts an "
                         "audit samples from (--max-receipts)")
    out: list[Source] = []
    for f in files:
        try:
            obj = _read(f)
        except AuditError:
            out.append(Source(f, None, f.name))
            continue
        if isinstance(obj, list):
            out += [Source(f, i, f"{f.name}[{i}]") for i in range(len(obj))]
        else:
            out.append(Source(f, None, f.name))
        if len(out) > max_items:
            raise AuditError(f"{path}: more than the {max_items} receipts an audit samples from "
                             "(--max-receipts)")
    return out


def _read(f: Path):
    try:
        if f.stat().st_size > MAX_RECEIPT_BYTES:
            raise AuditError(f"larger than {MAX_RECEIPT_BYTES} bytes")
        return safejson.loads(f.read_bytes(), max_bytes=MAX_RECEIPT_BYTES)
    except (OSError, safejson.JSONError) as e:
        raise AuditError(f"cannot read ({e})") from None


def load_items(sources: list[Source]) -> Iterator[Item]:
    """The items of `sources` (in file order), each file parsed once, one file held at a time."""
    cached: tuple[Path | None, object] = (None, None)
    for s in sorted(sources, key=lambda s: (str(s.path), s.index or 0)):
        if cached[0] != s.path:
            try:
                cached = (s.path, _read(s.path))
            except AuditError as e:
                cached = (s.path, e)
        obj = cached[1]
        if isinstance(obj, AuditError):
            yield Item(s.label, error=("receipt_unreadable", f"{s.label}: {obj}"))
            continue
        if s.index is not None:
            obj = obj[s.index] if isinstance(obj, list) and s.index < len(obj) else None
        elif isinstance(obj, list):
            obj = None
        yield _item(obj, s.label)


def _item(obj, label: str) -> Item:
    try:
        return Item(label, from_saved(obj))
    except ExchangeError as e:
        return Item(label, error=("exchange_malformed", f"{label}: {e}"))


def server_items(server: str, limit: int, deadline_s: float, audit_key: str | None) -> list[Item]:
    """The server's `limit` most recent receipts (nothing of the clients': no request, no text)."""
    try:
        data = httpclient.exchange(f"{server}/v1/receipts?limit={limit}", None,
                                   limit=MAX_LIST_BYTES, deadline_s=deadline_s, bearer=audit_key)
        listed = safejson.loads(data, max_bytes=MAX_LIST_BYTES)["data"]
    except httpclient.Refused as e:
        raise AuditError(f"{server}/v1/receipts: {e}") from None
    except httpclient.Unreachable as e:
        raise AuditError(str(e)) from None
    except (safejson.JSONError, KeyError, TypeError) as e:
        raise AuditError(f"{server}/v1/receipts: not a receipt list ({e})") from None
    if not isinstance(listed, list) or len(listed) > limit:
        raise AuditError(f"{server}/v1/receipts: not a list of at most {limit} receipts")
    # Bare receipts only: an entry shaped like a client's record is the server's, and nothing in
    # it is the client's (it fails check_receipt as a receipt: a REJECTED row).
    return [Item(f"server[{i}]", Exchange(r)) if isinstance(r, dict) else
            Item(f"server[{i}]", error=("receipt_malformed", "not a JSON object"))
            for i, r in enumerate(listed)]


def sample(items: list, rate: float, rng: random.Random | None = None) -> list:
    """ceil(rate * n) of the items (at least one), drawn by the auditor, not the server."""
    if not 0 < rate <= 1:
        raise AuditError(f"--rate must be in (0, 1], got {rate}")
    k = max(1, math.ceil(rate * len(items))) if items else 0
    return (rng or random.SystemRandom()).sample(items, k)


# --- audit --------------------------------------------------------------------------------------

def audit_item(key, tokenizer, server: str, item: Item, tier: str, max_opening: int,
               deadline_s: float, audit_key: str | None = None) -> Row:
    """Challenge one receipt, fetch its opening (one exchange, one deadline), verify it. Every
    fault of the server or of the saved data is a rejection; a refused audit credential (401,
    403) is the auditor's problem: AuditError."""
    if item.error is not None:
        return Row(None, item.source, 0, _reject(*item.error))
    ex = item.exchange
    r = ex.receipt
    row = Row(str(r.get("receipt_id"))[:64], item.source,
              len(r.get("output_token_ids") or []) if isinstance(r.get("output_token_ids"), list)
              else 0, Verdict())
    try:
        cfg = key.meta["config"]  # bounds from the key, never from the receipt
        check_receipt(r, vocab_size=cfg["vocab_size"], max_positions=cfg["max_position_embeddings"])
        c = challenge_mod.derive(key.secret, r, tier, n_layers=cfg["num_hidden_layers"])
    except ReceiptError as e:
        row.verdict = _reject(e.code, str(e))
        return row
    except (ValueError, KeyError, TypeError) as e:  # a receipt no challenge can be drawn for
        row.verdict = _reject("receipt_malformed", f"{type(e).__name__}: {e}")
        return row
    row.positions = len(c["positions"])
    try:
        data = httpclient.exchange(f"{server}/v1/audit", json.dumps(c).encode(),
                                   limit=max_opening, deadline_s=deadline_s, bearer=audit_key)
    except httpclient.Refused as e:
        if e.status in (401, 403):
            raise AuditError(f"{server}/v1/audit: {e} (give the server's audit key: --audit-key "
                             "or COMMITLLM_AUDIT_KEY)") from None
        row.verdict = _reject("opening_unavailable", str(e))
        return row
    except httpclient.Unreachable as e:
        row.verdict = _reject("opening_unavailable", str(e))
        return row
    row.opening_bytes = len(data)
    try:
        meta, arrays = container.loads(data, OPENING_MAGIC, OPENING_VERSION, max_opening)
    except container.ContainerVersionError as e:
        row.verdict = _reject("opening_malformed", f"{e}; {OPENING_UPGRADE}")
        return row
    except Exception as e:  # noqa: BLE001 - whatever the server's bytes break, it is its fault
        row.verdict = _reject("opening_malformed", f"{type(e).__name__}: {e}")
        return row
    row.verdict = verify(key, r, c, meta, arrays, tokenizer, **ex.verify_kwargs())
    return row


def _reject(code: str, detail: str) -> Verdict:
    v = Verdict(accepted=False, reason=code, detail=detail)
    v.checks.append({"check": code, "ok": False, "detail": detail})
    return v

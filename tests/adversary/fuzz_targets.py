"""Fuzz targets: each takes the fuzzer's bytes, builds a hostile input from them and the honest
exchange, runs it through the verifier's front door (fuzz_glue), and says what happened.

Targets
* ``container``: the bytes are an opening container (seeded with the honest one; the fuzzer
  mutates bytes); parsed, then verified with the honest receipt and challenge.
* ``receipt``: the bytes are a receipt file (seeded with the honest one); parsed, verified.
* ``challenge``: the bytes are a challenge file; parsed, verified.
* ``request``: the bytes are the client's saved request; parsed, verified.
* ``verify``: the bytes drive structured edits (fuzz_mutate) of every artifact at once: JSON
  values replaced, deleted or added with values of every JSON type, the receipt resealed as a
  provider would, arrays retyped, byte-swapped, reshaped, added, dropped or edited.

Outcome of one input: "parse" (the parser refused it with its own error), "rejected" (a Verdict
with a reason), "honest" (accepted, and equal to the honest exchange), "forgery" (accepted, and not
equal: a security bug), or an exception escaping (a crash: the harness records it).
"""

from __future__ import annotations

import fuzz_glue as g
import fuzz_mutate as m

TARGETS = ("container", "receipt", "challenge", "request", "verify")


class Forgery(AssertionError):
    """verify() accepted artifacts that differ from the honest exchange."""


def seeds(h: g.Honest, target: str) -> list[bytes]:
    """Honest inputs the fuzzer starts from."""
    return {"container": [h.opening_bytes], "receipt": [h.receipt_bytes],
            "challenge": [h.challenge_bytes], "request": [h.request_bytes],
            "verify": [b"\x00" * 16, bytes(range(64))]}[target]


def run(h: g.Honest, target: str, data: bytes) -> tuple[str, str | None]:
    """(outcome, reason code or None) for one input; raises Forgery, or whatever crashed."""
    rec, chal, meta, arrays, req = h.receipt, h.challenge, h.meta, h.arrays, h.request
    errors = g.parse_errors()
    try:
        if target == "container":
            meta, arrays = g.parse_opening(data)
        elif target == "receipt":
            rec = g.parse_json(data)
        elif target == "challenge":
            chal = g.parse_json(data)
        elif target == "request":
            req = g.parse_json(data)
        elif target == "verify":
            rec, chal, meta, arrays, req = m.mutate(h, data)
        else:
            raise ValueError(f"unknown target {target!r}")
    except errors as e:
        return "parse", type(e).__name__
    v = g.verify(h, rec, chal, meta, arrays, req)
    if not v.accepted:
        if not isinstance(v.reason, str) or not v.reason:
            raise AssertionError(f"a rejection without a reason code: {v!r}")
        return "rejected", v.reason
    if g.is_honest(h, rec, chal, meta, arrays, req):
        return "honest", None
    raise Forgery(f"{target}: accepted an edited exchange ({m.describe(h, rec, chal, meta, arrays, req)})")

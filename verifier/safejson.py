"""Bounded JSON parsing for everything that comes from outside: receipts, challenges, container
metadata, receipt lists, error bodies, request files.

`json.loads` alone accepts inputs that cost or mean more than they look: nesting deep enough to
hit the interpreter's recursion limit, integers of thousands of digits (quadratic conversion),
`NaN` / `Infinity` / `1e999` (non-finite floats that break every later comparison), and duplicate
object keys (two parsers can disagree on which one wins). `loads` refuses each of them, with the
size and depth checked by one linear scan *before* the document is parsed.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

MAX_DEPTH = 64  # honest documents nest 3-5 levels (a receipt's request messages: 4)
MAX_NUMBER_CHARS = 40  # an int64 is 20 characters, a repr'd float at most 24
# A string, or an unterminated one running to the end: possessive, so each character is scanned
# once whatever the input (no backtracking, no retry from every later quote).
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\Z)', re.S)


class JSONError(ValueError):
    """Input that is not bounded, finite, duplicate-free JSON; the message says which limit."""


def loads(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH,
          max_number_chars: int = MAX_NUMBER_CHARS):
    """Parse `data` as JSON under the limits; raises JSONError (a ValueError) on anything else."""
    if len(data) > max_bytes:
        raise JSONError(f"larger than the {max_bytes}-byte limit")
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    check_structure(data, max_depth, max_number_chars)

    def finite(x: str) -> float:
        f = float(x)
        if not math.isfinite(f):
            raise JSONError(f"number {x[:24]} is not a finite float")
        return f

    try:
        return json.loads(data, parse_float=finite,
                          parse_constant=_constant, object_pairs_hook=_object)
    except JSONError:
        raise
    except RecursionError:  # unreachable after check_structure; kept as a second fence
        raise JSONError("nested too deeply") from None
    except ValueError as e:
        raise JSONError(f"not JSON ({e})") from None


def check_structure(text: str, max_depth: int, max_number_chars: int) -> None:
    """Raise JSONError when brackets outside strings nest deeper than max_depth, or a number
    outside strings is longer than max_number_chars; linear in the text, before any parsing."""
    rest = _STRING.sub("", text)
    if (m := re.search(r"[-+0-9.eE]{%d,}" % (max_number_chars + 1), rest)) is not None and len(m.group()) > max_number_chars:
        raise JSONError(f"number of {len(m.group())} characters (limit {max_number_chars})")
    b = np.frombuffer(rest.encode(), dtype=np.uint8)
    step = ((b == ord("[")) | (b == ord("{"))).astype(np.int32)
    step -= (b == ord("]")) | (b == ord("}"))
    if step.size and int(np.cumsum(step).max()) > max_depth:
        raise JSONError(f"nested deeper than {max_depth} levels")


def _constant(name: str):
    raise JSONError(f"{name} is not a JSON number")


def _object(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JSONError(f"duplicate key {dup[:40]!r}")
    return out


def uint_ids(ids, limit: int = 1 << 32) -> bool:
    """Whether ids is a list (or tuple) of plain ints (not bools, not int subclasses) in
    [0, limit): the type pass and min/max run in C, not one Python step per id."""
    return isinstance(ids, (list, tuple)) and (not ids or (
        set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < limit))


__all__ = ["JSONError", "MAX_DEPTH", "check_structure", "loads", "uint_ids"]

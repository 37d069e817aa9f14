"""Structured edits of an honest exchange, driven by fuzzer bytes (the ``verify`` target).

The bytes are read as a little program: how many edits (1-4), then per edit which artifact
(receipt, challenge, opening meta, opening arrays, the client's request), where (a JSON path of
the honest document, or an array name), what (replace with a value of some JSON type, delete, add
an unknown key; for arrays: retype, byte-swap, reshape, drop or add a row, edit one element, add
an array, drop one) and whether the provider reseals the receipt after its edits (it can: every
receipt hash is public). The values are the ones that break parsers and type checks: booleans for
numbers, floats for integers, huge and negative integers, 1e308, empty and deep containers, lone
surrogates, long strings.
"""

from __future__ import annotations

import copy

import fuzz_glue as g
import numpy as np
from advworld import json_paths


class Bytes:
    """Reads choices from fuzzer bytes; past the end every read is 0."""

    def __init__(self, data: bytes):
        self.data, self.i = data, 0

    def byte(self) -> int:
        b = self.data[self.i] if self.i < len(self.data) else 0
        self.i += 1
        return b

    def int(self, n: int) -> int:
        """An integer in [0, n)."""
        if n <= 1:
            return 0
        x = 0
        for _ in range((n.bit_length() + 7) // 8):
            x = (x << 8) | self.byte()
        return x % n

    def pick(self, items):
        return items[self.int(len(items))]

    def chunk(self, n: int) -> bytes:
        return bytes(self.byte() for _ in range(n))


INTS = [0, 1, -1, 2, 7, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, -2**63, 10**30]
FLOATS = [0.0, -0.0, 0.5, 1.0, 1e-45, 1e-38, 3.4e38, 1e308, -1e308, 2.5]
STRINGS = ["", "a", "\ud800", "x" * 300, "0" * 64, "f" * 64, "null", "true", "{"]


def value(b: Bytes):
    """A JSON value of some type, or derived from the old one by the caller."""
    kind = b.int(9)
    if kind == 0:
        return b.pick(INTS)
    if kind == 1:
        return b.pick(FLOATS)
    if kind == 2:
        return b.pick([True, False])
    if kind == 3:
        return None
    if kind == 4:
        return b.pick(STRINGS)
    if kind == 5:
        return [value(b) for _ in range(b.int(3))]
    if kind == 6:
        return {b.pick(["", "x", "seed", "mac", "version"]): value(b) for _ in range(b.int(3))}
    if kind == 7:  # nested
        v = value(b)
        for _ in range(b.int(24)):  # deep, within what the JSON reader admits (64)
            v = [v]
        return v
    return int.from_bytes(b.chunk(4), "little") - 2**31


def near(old, b: Bytes):
    """A value close to `old` (same type where it has one: the edits a type check misses)."""
    if isinstance(old, bool):
        return int(old) if b.int(2) else (not old)
    if isinstance(old, int):
        return b.pick([old + 1, old - 1, float(old), str(old), old + 2**32, -old, bool(old % 2)])
    if isinstance(old, float):
        return b.pick([old * 2, -old, int(old), str(old), old + 1e-7, float("1e308")])
    if isinstance(old, str):
        if not old:
            return "a"
        i = b.int(len(old))
        return b.pick([old[:i] + chr((ord(old[i]) + 1) % 0x10FFFF or 1) + old[i + 1:], old + old,
                       old[:-1], old.upper(), old + "\ud800"])
    if isinstance(old, list):
        return b.pick([old[:-1], old + old[-1:], old[::-1], []]) if old else [0]
    if isinstance(old, dict):
        return {**old, b.pick(["extra", "x", "chat", "stop"]): value(b)}
    return value(b)


def edit_json(doc, b: Bytes):
    """One edit at a path of the document (its honest paths, so edits reach deep fields)."""
    paths = json_paths(doc)
    if not paths:
        return value(b)
    path = b.pick(paths)
    out = copy.deepcopy(doc)
    node = out
    for k in path[:-1]:
        node = node[k]
    op, last = b.int(4), path[-1]
    if op == 0:
        node[last] = value(b)
    elif op == 1:
        node[last] = near(node[last], b)
    elif op == 2:
        del node[last]
    else:  # an unknown key next to the edited one, or a list grown
        if isinstance(node, dict):
            node[b.pick(["extra", "chat", "x-" + str(last), "stop", "logprobs"])] = value(b)
        else:
            node.append(near(node[last], b))
    return out


DTYPES = ["<i1", "<u1", "<i2", ">i2", "<u2", "<i4", ">i4", "<i8", "<f2", "<f4", ">f4", "<f8"]


def edit_arrays(arrays: dict, b: Bytes) -> dict:
    out = dict(arrays)
    names = sorted(out)
    name = b.pick(names)
    a = out[name]
    op = b.int(9)
    if op == 0:  # the same values under another dtype
        out[name] = a.astype(b.pick(DTYPES))
    elif op == 1:  # the same bytes under another dtype (a header that lies about the type)
        dt = np.dtype(b.pick(DTYPES))
        raw = a.tobytes()
        n = len(raw) // dt.itemsize
        out[name] = np.frombuffer(raw[:n * dt.itemsize], dtype=dt).copy()
    elif op == 2:  # byte order swapped, values kept
        out[name] = a.astype(a.dtype.newbyteorder())
    elif op == 3:
        out[name] = a.reshape(-1)
    elif op == 4:
        out[name] = a[:-1] if a.ndim and a.shape[0] else a
    elif op == 5:
        out[name] = np.concatenate([a, a[-1:]]) if a.ndim and a.shape[0] else a.reshape(-1)[:1]
    elif op == 6:  # one element changed
        c = a.copy().reshape(-1)
        if c.size:
            i = b.int(c.size)
            if c.dtype.kind == "f":
                c[i] = b.pick([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40, c[i] * 2 + 1, -c[i]])
            else:
                info = np.iinfo(c.dtype)
                c[i] = b.pick([info.max, info.min, 0, (int(c[i]) + 1) % (int(info.max) + 1)])
        out[name] = c.reshape(a.shape)
    elif op == 7:  # an array the verifier did not ask for
        out[b.pick(["extra", name + ".x", "embed.extra"])] = a.copy()
    else:
        del out[name]
    return out


ARTIFACTS = ("receipt", "challenge", "meta", "arrays", "request")


def mutate(h: g.Honest, data: bytes):
    """(receipt, challenge, meta, arrays, request) after the edits the bytes ask for."""
    b = Bytes(data)
    docs = {"receipt": h.receipt, "challenge": h.challenge, "meta": h.meta,
            "arrays": h.arrays, "request": h.request}
    for _ in range(1 + b.int(4)):
        what = b.pick(ARTIFACTS)
        docs[what] = edit_arrays(docs[what], b) if what == "arrays" else edit_json(docs[what], b)
    if b.int(2):  # the provider reseals its receipt
        sealed = g.resealed(docs["receipt"])
        if sealed is not None:
            docs["receipt"] = sealed
    return docs["receipt"], docs["challenge"], docs["meta"], docs["arrays"], docs["request"]


def describe(h: g.Honest, rec, chal, meta, arrays, req) -> str:
    """Which artifacts differ from the honest ones, and where (for a forgery's report)."""
    out = []
    for name, doc, ref in (("receipt", rec, h.receipt), ("challenge", chal, h.challenge),
                           ("meta", meta, h.meta), ("request", req, h.request)):
        if not g.same_json(doc, ref):
            out.append(f"{name}: {_diff(doc, ref)}")
    if not g.same_arrays(arrays, h.arrays):
        names = set(arrays) ^ set(h.arrays)
        changed = [k for k in set(arrays) & set(h.arrays)
                   if arrays[k].dtype.str != h.arrays[k].dtype.str
                   or arrays[k].shape != h.arrays[k].shape
                   or arrays[k].tobytes() != h.arrays[k].tobytes()]
        out.append(f"arrays: added/removed {sorted(names)}, changed {sorted(changed)}")
    return "; ".join(out)


def _diff(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b or not g.same_json(a[k], b[k]):
                return _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}/{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if not g.same_json(x, y):
                return _diff(x, y, f"{path}/{i}")
    return f"{path or '/'} = {repr(a)[:60]} (honest {repr(b)[:60]})"

"""The compiled core: C routines that compute exactly what the numpy spec computes, faster.

The C source ships in the package and is built on first use with the system C compiler into
``native/`` of the project's cache folder (``$COMMITLLM_CACHE``, else ``~/.cache/commitllm``),
created 0700 and refused when others may write to it or its parent, keyed by a digest of the
source, the flags and the compiler, so later processes only load it (milliseconds). Without a
compiler, or with ``COMMITLLM_NATIVE=0``, `lib()` is None and callers use their numpy or torch
path, which gives the same bits (tests/test_native.py checks both routes against the spec).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..numerics.quant import split_planes
from ..safejson import uint_ids

SOURCES = tuple(Path(__file__).with_name(n) for n in ("attn.c", "freivalds.c", "bridge.c", "gemm.c",
                                                             "hash.c", "layer.c"))
# hashed into the build tag with the sources
HEADERS = tuple(Path(__file__).with_name(n) for n in ("exact.h", "layer.h"))
# no contraction into FMA, no reassociation, no approximate math: every float op as written
FLAGS = ("-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-unsafe-math-optimizations",
         "-fPIC", "-shared")
ABI = 15
_lock = threading.Lock()
_state: dict = {}


def enabled() -> bool:
    return os.environ.get("COMMITLLM_NATIVE", "1") != "0"


def cache_dir() -> Path:
    """Where built libraries go: native/ in $COMMITLLM_CACHE (else ~/.cache/commitllm)."""
    root = os.environ.get("COMMITLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "commitllm")
    return Path(root) / "native"


def _private_dir(path: Path) -> Path:
    """The folder, created 0700; refused when it or its parent belongs to another user or others
    may write to it (they could plant or swap the library this process loads)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for p in (path, path.parent):
        st = p.stat()
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionError(f"{p}: not a private folder of this user")
    return path


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _target() -> tuple[str, Path]:
    """The compiler and the library path for this source, flags and compiler version."""
    cc = _compiler()
    if cc is None:
        raise FileNotFoundError("no C compiler (cc) on PATH")
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    tag = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)
                         + repr((FLAGS, ver, sys.platform)).encode())
    return cc, cache_dir() / f"native-{tag.hexdigest()[:24]}.so"


def _build() -> Path:
    """Build the library unless it is there: each source compiled in its own process at once,
    then linked, into a private temporary folder, and moved into place atomically."""
    cc, out = _target()
    _private_dir(out.parent)
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        procs = [subprocess.Popen([cc, *FLAGS[:-1], "-c", "-o", str(o), str(src)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for src, o in zip(SOURCES, objs)]
        errs = [p.communicate(timeout=120)[1] for p in procs]
        bad = [e for p, e in zip(procs, errs) if p.returncode != 0]
        if bad:
            raise RuntimeError(f"building the compiled core failed: {bad[0].strip()[-500:]}")
        tmp_so = Path(tmp) / "native.so"
        proc = subprocess.run([cc, *FLAGS, "-o", str(tmp_so), *map(str, objs), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"linking the compiled core failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp_so, out)  # atomic: a concurrent process sees the old name or the whole file
    return out


def build_in_background(on: bool = True) -> None:
    """When the library is not built yet, lib() starts its build in a detached process and
    returns None at once (callers take their numpy or torch route, the same bits) instead of
    waiting for the compiler: for short runs such as one CLI verification, where the build
    (about two seconds) would cost more than it saves. Later processes load the library."""
    _state["background"] = on


def _spawn_build() -> None:
    subprocess.Popen([sys.executable, "-c", "from commitllm.verifier import native; "
                      "native._build()"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def lib():
    """The loaded library, or None (no compiler, build failed, building in the background, or
    COMMITLLM_NATIVE=0)."""
    if not enabled():
        return None
    so = _state.get("lib")
    if so is not None:
        return so
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["error"] = None, None
            try:
                if _state.get("background"):
                    _, path = _target()
                    if not path.exists():
                        _private_dir(path.parent)
                        _spawn_build()
                        raise RuntimeError("the compiled core is being built in the background "
                                           "(the next run uses it)")
                so = ctypes.CDLL(str(_build()))
                if so.commitllm_native_abi() != ABI:
                    raise RuntimeError("the compiled core's ABI does not match")
                _declare(so)
                _state["lib"] = so
            except (OSError, RuntimeError, subprocess.SubprocessError, PermissionError) as e:
                _state["error"] = f"{type(e).__name__}: {e}"
        return _state["lib"]


def error() -> str | None:
    """Why lib() is None, if it tried and failed."""
    return _state.get("error")


def _declare(so) -> None:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    so.commitllm_native_abi.restype = i64
    so.attn_coefs.restype = i64
    so.attn_coefs.argtypes = [p, i64, i64, i64, i64, p, p, p, i64, p, f32, f32, p, i64, p, p, p]
    so.attn_fused.restype = i64
    so.attn_fused.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64, i64,
                              f32, f32, p, i64, p, p, p]
    so.attn_fused_rows.restype = i64
    so.attn_fused_rows.argtypes = [p, p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64,
                                   i64, i64, f32, f32, p, i64, p, p, p]
    so.attn_route.restype = so.attn_best_route.restype = i64
    so.attn_route.argtypes = [i64]
    so.attn_pack.restype = i64
    so.dequant_planes.restype = i64
    so.dequant_planes.argtypes = [p, i64, i64, i64, i64, i64, i64, p, p, p, p]
    so.attn_pack.argtypes = [p, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, p]
    so.gemm_i16i8.restype = i64
    so.gemm_i16i8.argtypes = [p, i64, i64, p, i64, i64, i64, i64, i64, i64, p]
    so.fv_dot.restype = i64
    so.fv_dot.argtypes = [p, i64, p, i64, i64, i64, p]
    so.acc_unpack.restype = so.fv_acc_linear.restype = i64
    so.fv_acc_linear.argtypes = [p, i64, p, i64, i64, i64, p, p, p, p, p, i64, p]
    so.acc_unpack.argtypes = [p, i64, i64, p]
    so.fv_ifma.restype = i64
    so.fv_ifma.argtypes = [i64]
    so.b3_rows.restype = so.b3_multiproof.restype = i64
    so.b3_rows.argtypes = [i64, p, p, p, i64, p]
    so.b3_chain.restype = i64
    so.b3_chain.argtypes = [ctypes.c_char_p, i64, ctypes.c_char_p, p, i64, p]
    so.b3_multiproof.argtypes = [p, p, i64, ctypes.c_uint64, p, i64, p, i64, p]
    so.b3_proof.restype = i64
    so.b3_proof.argtypes = [p, i64, i64, i64]
    declare_bridge(so)
    from .layer import declare as declare_layer

    declare_layer(so)


def declare_bridge(so) -> None:
    """The argument types of bridge.c's routines (bridge.py calls them)."""
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for name, args in (("br_rmsnorm", [p, i64, i64, i64, p, f32, p]),
                       ("br_quantize", [p, i64, i64, i64, i64, i64, p, p]),
                       ("br_dequant", [p, i64, i64, p, p, p, p, i64, p]),
                       ("br_swiglu", [p, p, i64, i64, i64, i64, f32, p, p]),
                       ("br_rope", [p, i64, i64, i64, i64, i64, p, p, p]),
                       ("br_minmax", [p, i64, i64, p]),
                       ("br_rope_rows", [p, p, i64, i64, p, i64, p, p])):
        getattr(so, name).restype = i64
        getattr(so, name).argtypes = args


def _ptr(a: np.ndarray, dtype) -> int:
    if a.dtype != dtype or not a.flags.c_contiguous:
        raise TypeError(f"expected a C-contiguous {np.dtype(dtype).name} array, got {a.dtype}")
    return a.ctypes.data


_pool: dict[int, ThreadPoolExecutor] = {}
# a forked child has none of the parent's pool threads (its row splits would wait on them)
os.register_at_fork(after_in_child=_pool.clear)


def _pool_of(n: int) -> ThreadPoolExecutor:
    """The process's pool of n threads for the compiled core's row splits."""
    return _pool.get(n) or _pool.setdefault(n, ThreadPoolExecutor(n))


def _split_run(run, bounds: list[int], name: str) -> None:
    """run(a, b) over consecutive row ranges, on a thread pool when there are several (ctypes
    releases the GIL); the C codes become exceptions: -1 underflowed value scale, -2 NaN logit,
    anything else out of memory."""
    if len(bounds) == 2:
        codes = [run(bounds[0], bounds[1])]
    else:
        codes = list(_pool_of(len(bounds) - 1).map(run, bounds[:-1], bounds[1:]))
    for code in codes:
        if code == -1:
            raise FloatingPointError("attention value scale underflowed to zero")
        if code == -2:
            raise FloatingPointError("attention logit is NaN")
        if code:
            raise MemoryError(f"{name}: out of memory")


_local = threading.local()


_CORES = max(1, min(os.cpu_count() or 1, 16))  # read once: os.cpu_count() costs microseconds


def threads() -> int:
    """Threads for row-parallel routines: every core (at most 16), or the budget that
    thread_budget gave the calling thread."""
    return getattr(_local, "budget", None) or _CORES


@contextmanager
def thread_budget(n: int):
    """Row-parallel routines called from this thread use at most n threads inside (the
    verifier's layer threads share the cores instead of each splitting rows over all of them).
    The split of rows changes no bit."""
    before = getattr(_local, "budget", None)
    _local.budget = max(1, int(n))
    try:
        yield
    finally:
        _local.budget = before


def attn_coefs(s: np.ndarray, sq: np.ndarray, sk: np.ndarray, sv: np.ndarray,
               rows_per_group: int, nvis: np.ndarray, scale: float, frac: float,
               table: np.ndarray, cut: int, n_threads: int | None = None):
    """The softmax passes over rows of exact scores (see attn.c): s fp32 or float64 [R, S]
    (exact integers; float64 ones are rounded to fp32 as the spec does); sq fp32 [R];
    sk, sv fp32 [R / rows_per_group, S]; nvis int64 [R]; table int32 [cut + 1].
    Returns (c float64 [R, S], z int64 [R], m fp32 [R]). Rows are independent, so splitting
    them over threads changes no bit."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    rows, n_keys = s.shape
    if (sq.shape != (rows,) or nvis.shape != (rows,) or rows % rows_per_group
            or sk.shape != (rows // rows_per_group, n_keys) or sv.shape != sk.shape
            or table.shape != (cut + 1,)):
        raise ValueError("attn_coefs: inconsistent shapes")
    c = np.empty((rows, n_keys), np.float64)
    z = np.empty(rows, np.int64)
    m = np.empty(rows, np.float32)
    wide = s.dtype == np.float64
    args = [(_ptr(s, s.dtype if wide else np.float32), _ptr(sq, np.float32), _ptr(sk, np.float32),
             _ptr(sv, np.float32), _ptr(nvis, np.int64), _ptr(table, np.int32))]
    ps, psq, psk, psv, pnv, ptab = args[0]
    # one contiguous range of rows per thread, each of at least ~64k score elements
    n = max(1, min(n_threads or threads(), rows * n_keys // (1 << 16)))
    bounds = [rows * i // n for i in range(n + 1)]

    def run(a: int, b: int) -> int:
        if a == b:
            return 0
        return so.attn_coefs(ps + (8 if wide else 4) * a * n_keys, int(wide), a, b - a, n_keys,
                             psq + 4 * a, psk, psv, rows_per_group, pnv + 8 * a, scale, frac,
                             ptab, cut,
                             c.ctypes.data + 8 * a * n_keys, z.ctypes.data + 8 * a,
                             m.ctypes.data + 4 * a)
    _split_run(run, bounds, "attn_coefs")
    return c, z, m


# ---------------------------------------------------------------- the whole attention (attn_fused)

KEY_BLOCK = 16  # attn.c's KB: keys per score block
DIM_BLOCK = 32  # value dims per pass


def use_route(r: int = -1) -> int:
    """Make attn_fused take SIMD route r (0 plain C, 1 AVX2, 2 AVX-512 VNNI; -1 or one the CPU
    lacks: the best it has) and return the route now in use. Every route gives the same
    integers; tests run each one the machine has."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    return int(so.attn_route(r))


def use_ifma(on: bool = True) -> bool:
    """Let fv_dot and fv_acc_linear take their AVX-512 IFMA routes (bounds below 2^51, on a CPU
    with IFMA and the AVX-512 route active) or not (tests run both): whether they are in use
    now. Both give the same residues and bits."""
    so = lib()
    return False if so is None else bool(so.fv_ifma(1 if on else 0))


def best_route() -> int:
    so = lib()
    return -1 if so is None else int(so.attn_best_route())


def pack_queries(q: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """q int8/int16 [R, d] -> int16 planes [R, dp] (dp = d rounded up to even, zero filled):
    int16 rows as q = 256 * hi + lo with hi, lo in [-128, 128]; int8 rows are one plane."""
    rows, d = q.shape
    dp = d + d % 2
    q16 = np.zeros((rows, dp), np.int16)
    q16[:, :d] = q
    if q.dtype == np.int8:
        return q16, None
    if q.dtype != np.int16:
        raise TypeError(f"queries must be int8 or int16, got {q.dtype}")
    lo = (((q16.astype(np.int32) + 128) & 255) - 128).astype(np.int16)
    hi = ((q16.astype(np.int32) - lo) >> 8).astype(np.int16)
    return hi, lo


def _pack(x: np.ndarray, vals: bool, width: int, blocks: int, per: int) -> np.ndarray:
    """attn.c's attn_pack over x int8/int16 [G, S, d] or [B, S, H, d] (the cache's layout, any
    strides); G = B * H groups in that order."""
    if x.ndim == 4:
        x = x.transpose(0, 2, 1, 3)  # [B, H, S, d]
    elif x.ndim == 3:
        x = x[None]
    else:
        raise ValueError("pack: expected [G, S, d] or [B, S, H, d]")
    if x.dtype not in (np.int8, np.int16):
        raise TypeError(f"pack: int8 or int16 expected, got {x.dtype}")
    es = x.dtype.itemsize
    if any(st % es or st < 0 for st in x.strides):  # attn_pack reads forward, element-aligned
        x = np.ascontiguousarray(x)
    bsz, heads, s, d = x.shape
    st = [v // es for v in x.strides]
    shape = (bsz * heads, blocks, width // 2, per, 2) if not vals else (bsz * heads, blocks,
                                                                         width, 2)
    out = np.empty(shape, np.int16)
    code = lib().attn_pack(x.ctypes.data, es, int(vals), bsz, heads, s, d, *st, width, blocks,
                           out.ctypes.data)
    if code:
        raise ValueError("pack: inconsistent sizes")
    return out


def pack_keys(k: np.ndarray) -> np.ndarray:
    """k int8/int16 [G, S, d] (or [B, S, H, d]) -> int16 [G, ceil(S/16), dp/2, 16, 2]: blocks of
    16 keys, a lane a key, two dims per lane; zeros past S and d (dp = d rounded up to even)."""
    s, d = k.shape[-3] if k.ndim == 4 else k.shape[1], k.shape[-1]
    return _pack(k, False, d + d % 2, -(-s // KEY_BLOCK), KEY_BLOCK)


def pack_values(v: np.ndarray) -> np.ndarray:
    """v int8/int16 [G, S, d] (or [B, S, H, d]) -> int16 [G, ceil(S/2), dv, 2]: pairs of keys, a
    lane a dim (dv = d rounded up to 32); zeros past S and d."""
    s, d = v.shape[-3] if v.ndim == 4 else v.shape[1], v.shape[-1]
    return _pack(v, True, -(-d // DIM_BLOCK) * DIM_BLOCK, -(-s // 2), 2)


def attn_fused(q: np.ndarray, sq: np.ndarray, kp: np.ndarray, sk: np.ndarray, vp: np.ndarray,
               sv: np.ndarray, nvis: np.ndarray, rows_per_group: int, d: int, scale: float,
               frac: float, table: np.ndarray, cut: int, n_threads: int | None = None,
               nlo: np.ndarray | None = None):
    """The spec's attention over groups of query rows sharing one K/V head (see attn.c):
    q int8/int16 [R, d] (R = G * rows_per_group), sq fp32 [R], kp / vp from pack_keys /
    pack_values over [G, S, d], sk / sv fp32 [G, S], nvis int64 [R] (row r sees keys
    0 .. nvis[r]-1, at least one), nlo int64 [R] or None (a sliding window: row r sees only
    keys nlo[r] .. nvis[r]-1). Returns (out fp32 [R, d], z int64 [R], m fp32 [R]).
    Rows are independent, so the thread split changes no bit."""
    g, n_keys = sk.shape
    dp = d + d % 2
    nkb, dv, nvp = kp.shape[1], vp.shape[2], vp.shape[1]
    if (kp.shape != (g, nkb, dp // 2, KEY_BLOCK, 2) or nkb * KEY_BLOCK < n_keys
            or vp.shape != (g, nvp, dv, 2) or 2 * nvp < n_keys or dv < d or dv % DIM_BLOCK):
        raise ValueError("attn_fused: inconsistent shapes")
    kv = (_ptr(kp, np.int16), _ptr(vp, np.int16))
    return _attn(lambda so: so.attn_fused, kv, (nkb, dv, nvp), q, sq, sk, sv, nvis,
                 rows_per_group, d, scale, frac, table, cut, n_threads, nlo)


def attn_fused_rows(q: np.ndarray, sq: np.ndarray, k: np.ndarray, sk: np.ndarray, v: np.ndarray,
                    sv: np.ndarray, nvis: np.ndarray, rows_per_group: int, d: int, scale: float,
                    frac: float, table: np.ndarray, cut: int, n_threads: int | None = None,
                    nlo: np.ndarray | None = None):
    """attn_fused over K/V rows where they lie: k, v int8/int16 [S, G, d] (one dtype; rows with
    negative or misaligned strides are copied first), each group packed
    inside the call into a buffer that stays in cache (no pack_keys / pack_values pass over the
    whole cache first). The same bits as attn_fused over pack_keys / pack_values of k, v."""
    g, n_keys = sk.shape
    if (k.ndim != 3 or k.shape != (n_keys, g, d) or v.shape != k.shape or k.dtype != v.dtype
            or k.dtype not in (np.int8, np.int16)):
        raise ValueError("attn_fused_rows: inconsistent shapes")
    es = k.dtype.itemsize
    k, v = (np.ascontiguousarray(a) if any(st % es or st < 0 for st in a.strides) else a
            for a in (k, v))  # attn_pack reads forward, element-aligned (as _pack)
    desc = np.array([es, *(st // es for st in k.strides), *(st // es for st in v.strides)],
                    np.int64)
    nkb, dv, nvp = -(-n_keys // KEY_BLOCK), -(-d // DIM_BLOCK) * DIM_BLOCK, -(-n_keys // 2)
    kv = (k.ctypes.data, v.ctypes.data, desc.ctypes.data)
    return _attn(lambda so: so.attn_fused_rows, kv, (nkb, dv, nvp), q, sq, sk, sv, nvis,
                 rows_per_group, d, scale, frac, table, cut, n_threads, nlo)


def _attn(entry, kv: tuple, sizes: tuple, q, sq, sk, sv, nvis, rows_per_group: int, d: int,
          scale: float, frac: float, table, cut: int, n_threads, nlo):
    """attn_fused / attn_fused_rows: the shared checks, outputs and row split over threads."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    rows = q.shape[0]
    g, n_keys = sk.shape
    qh, ql = pack_queries(q)
    dp = qh.shape[1]
    if (q.shape != (rows, d) or sq.shape != (rows,) or nvis.shape != (rows,)
            or rows != g * rows_per_group or sv.shape != sk.shape
            or table.shape != (cut + 1,)
            or (nlo is not None and (nlo.shape != (rows,) or nlo.dtype != np.int64))):
        raise ValueError("attn_fused: inconsistent shapes")
    out = np.empty((rows, d), np.float32)
    z = np.empty(rows, np.int64)
    m = np.empty(rows, np.float32)
    if rows == 0:
        return out, z, m
    ptrs = (_ptr(qh, np.int16), 0 if ql is None else _ptr(ql, np.int16), *kv,
            _ptr(sq, np.float32), _ptr(sk, np.float32), _ptr(sv, np.float32),
            _ptr(nvis, np.int64), 0 if nlo is None else _ptr(nlo, np.int64))
    tail = (scale, frac, _ptr(table, np.int32), cut, out.ctypes.data, z.ctypes.data,
            m.ctypes.data)
    # contiguous row ranges of about equal work (visible keys), one per thread
    seen = np.clip(nvis, 1, n_keys) - (0 if nlo is None else np.clip(nlo, 0, n_keys - 1))
    work = np.cumsum(np.maximum(seen, 1) * 1.0)
    n = max(1, min(n_threads or threads(), int(work[-1] * d) // (1 << 21) + 1))
    bounds = [0] + [int(np.searchsorted(work, work[-1] * i / n)) for i in range(1, n)] + [rows]
    call = entry(so)

    def run(a: int, b: int) -> int:
        if a >= b:
            return 0
        return call(*ptrs, a, b - a, rows_per_group, n_keys, dp, *sizes, d, *tail)
    _split_run(run, bounds, "attn_fused")
    return out, z, m


# ---------------------------------------------------------------- linear outputs (dequant_planes)

def dequant_planes(parts: np.ndarray, nx: int, sx: np.ndarray, sw: np.ndarray,
                   bias: np.ndarray | None, n_threads: int | None = None) -> np.ndarray:
    """A linear's exact accumulator from its int8-plane products and its dequantized output in
    one pass (see attn.c): parts int32 [nw, nx * M, N] (weight planes, then activation planes,
    most significant first), sx fp32 [M], sw fp32 [N], bias fp32 [N] or None -> fp32 [M, N],
    ((f32(z) * sx) * sw) + bias with z the recombined int64 accumulator."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    nw, rows, n = parts.shape
    m = rows // nx if nx > 0 else 0
    if (nx <= 0 or rows != nx * m or sx.shape != (m,) or sw.shape != (n,)
            or (bias is not None and bias.shape != (n,)) or nw * nx > 4):
        raise ValueError("dequant_planes: inconsistent shapes")
    y = np.empty((m, n), np.float32)
    args = (_ptr(parts, np.int32), nw, nx, m, n)
    tail = (_ptr(sx, np.float32), _ptr(sw, np.float32),
            0 if bias is None else _ptr(bias, np.float32), y.ctypes.data)
    k = max(1, min(n_threads or 1, m * n // (1 << 16) + 1))
    bounds = [m * i // k for i in range(k + 1)]

    def run(a: int, b: int) -> int:
        return so.dequant_planes(*args, a, b, *tail) if a < b else 0
    _split_run(run, bounds, "dequant_planes")
    return y


# ---------------------------------------------------------------- small-row GEMM (gemm.c)

GEMM_BLOCK = 16  # gemm.c's GN: output columns per weight block
# weights (N x K) from which gemm_i16i8 splits its blocks over threads: below it the pool's
# dispatch costs more than the second core saves
GEMM_SPLIT_WEIGHTS = 1 << 24


def pack_weight(w: np.ndarray) -> np.ndarray:
    """w [N, K] -> gemm.c's layout int8 [planes, ceil(N/16), ceil(K/2), 16, 2]: blocks of 16
    output columns, a lane a column, two k per lane, zeros past N and K; an int8 w is one plane,
    an int16 w two int8 ones (hi, lo with w = 256 * hi + lo; |w| <= 127 * 257 keeps hi in int8)."""
    if w.dtype not in (np.int8, np.int16) or w.ndim != 2:
        raise TypeError(f"pack_weight expects int8 or int16 [N, K], got {w.dtype} {w.shape}")
    planes = list(split_planes(w)) if w.dtype == np.int16 else [w]  # OverflowError past 127*257
    n, k = w.shape
    nb, kp = -(-n // GEMM_BLOCK), -(-k // 2)
    out = np.zeros((len(planes), nb * GEMM_BLOCK, kp * 2), np.int8)
    for i, p in enumerate(planes):
        out[i, :n, :k] = p
    return np.ascontiguousarray(out.reshape(len(planes), nb, GEMM_BLOCK, kp, 2)
                                .transpose(0, 1, 3, 2, 4))


def gemm_i16i8(x: np.ndarray, wp: np.ndarray, n: int, n_threads: int | None = None) -> np.ndarray:
    """z = x @ w.T exactly, int64 [M, N], for x int16 (or int8) [M, K] and wp = pack_weight(w)
    (see gemm.c: int32 sums of 128 pairs, widened; any int16 x int8 or int16)."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    if wp.ndim != 5 or wp.dtype != np.int8 or not wp.flags.c_contiguous:
        raise ValueError("gemm_i16i8: the weight is not pack_weight's layout")
    nw, nb, kp = wp.shape[:3]
    if (x.ndim != 2 or x.dtype not in (np.int8, np.int16) or not 1 <= nw <= 2
            or wp.shape[3:] != (GEMM_BLOCK, 2) or -(-x.shape[1] // 2) != kp
            or not 0 < n <= nb * GEMM_BLOCK or nb * GEMM_BLOCK - n >= GEMM_BLOCK):
        raise ValueError("gemm_i16i8: inconsistent shapes")
    m = x.shape[0]
    if x.dtype != np.int16 or x.shape[1] != 2 * kp or x.strides[1] != 2:
        x16 = np.zeros((m, 2 * kp), np.int16)
        x16[:, :x.shape[1]] = x
        x = x16
    z = np.empty((m, n), np.int64)
    if m == 0:
        return z
    t = max(1, min(n_threads or threads(), nb)) if wp.size >= GEMM_SPLIT_WEIGHTS else 1
    bounds = [nb * i // t for i in range(t + 1)]
    ps = wp.strides[0]

    def run(a: int, b: int) -> int:
        return so.gemm_i16i8(x.ctypes.data, m, x.strides[0] // 2, wp.ctypes.data, nw, ps, kp, n,
                             a, b, z.ctypes.data) if a < b else 0
    _split_run(run, bounds, "gemm_i16i8")
    return z


# ---------------------------------------------------------------- Freivalds (freivalds.c)

_FV_WIDTHS = {np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 4,
              np.dtype(np.int64): 8}


def fv_dot(a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """sum_i a[i] b[m, i] mod 2^61 - 1 for each row of b int8/16/32/64 [M, N], with a the secret
    residues int64 [N], each below 2^61 - 1 (freivalds.prepare checks; see freivalds.c): uint64
    [M] residues. Every |b| <= bound (< 2^62) is checked on the way (OverflowError)."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    width = _FV_WIDTHS.get(b.dtype)
    if width is None or b.ndim != 2 or a.shape != (b.shape[1],):
        raise ValueError(f"fv_dot: b {b.dtype} {b.shape} does not match a {a.shape}")
    b = np.ascontiguousarray(b)
    out = np.empty(b.shape[0], np.uint64)
    if not 0 <= bound < 2**62:
        raise OverflowError(f"fv_dot: bound {bound} outside [0, 2^62)")
    code = so.fv_dot(_ptr(a, np.int64), b.shape[1], b.ctypes.data, width, b.shape[0], bound,
                     out.ctypes.data)
    if code == -3:
        raise OverflowError("fv_dot: a value of b exceeds its bound")
    if code:
        raise ValueError(f"fv_dot: code {code}")
    return out


def fv_acc_linear(a: np.ndarray, packed: np.ndarray, bound: int, sx: np.ndarray,
                  sw: np.ndarray, bias: np.ndarray | None = None,
                  resid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """One pass over packed accumulators uint8 [M, N, w] (freivalds.c): (fv_dot(a, z, bound),
    bridge.dequantize(z, sx, sw, bias, resid)) of their values z, or None where the compiled
    routine does not answer (a value beyond the bound or one the dequantization does not take,
    another byte order); the arrays fp32 C-contiguous (resid [M, N])."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    if packed.dtype != np.uint8 or packed.ndim != 3 or not 1 <= packed.shape[2] <= 8:
        raise ValueError("fv_acc_linear: expected packed uint8 [M, N, w] with 1 <= w <= 8")
    m, n, w = packed.shape
    if a.shape != (n,):
        raise ValueError(f"fv_acc_linear: a {a.shape} does not match N = {n}")
    if not 0 <= bound < 2**62:
        raise OverflowError(f"fv_acc_linear: bound {bound} outside [0, 2^62)")
    for arr, shape in ((sx, (m,)), (sw, (n,)), (bias, (n,)), (resid, (m, n))):
        if arr is not None and (arr.dtype != np.float32 or arr.shape != shape
                                or not arr.flags.c_contiguous):
            raise ValueError(f"fv_acc_linear: expected fp32 {shape}")
    packed = np.ascontiguousarray(packed)
    out, y = np.empty(m, np.uint64), np.empty((m, n), np.float32)
    code = so.fv_acc_linear(_ptr(a, np.int64), n, packed.ctypes.data, w, m, bound,
                            out.ctypes.data, sx.ctypes.data, sw.ctypes.data,
                            None if bias is None else bias.ctypes.data,
                            None if resid is None else resid.ctypes.data, n, y.ctypes.data)
    if code == -5:
        raise ValueError(f"fv_acc_linear: code {code}")
    return None if code else (out, y)


def acc_unpack(b: np.ndarray) -> np.ndarray | None:
    """Packed accumulators uint8 [..., w] (w-byte little-endian two's complement, 1 <= w <= 8)
    as int64 [...] (freivalds.c), or None where the routine does not run (another byte order)."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    if b.dtype != np.uint8 or b.ndim < 1 or not 1 <= b.shape[-1] <= 8:
        raise ValueError("acc_unpack: expected uint8 [..., w] with 1 <= w <= 8")
    b = np.ascontiguousarray(b)
    out = np.empty(b.shape[:-1], np.int64)
    if so.acc_unpack(b.ctypes.data, out.size, b.shape[-1], out.ctypes.data):
        return None
    return out


# ---------------------------------------------------------------- BLAKE3 (hash.c)

# rows of data per thread before b3_many splits a batch (thread start-up would cost more)
B3_SPLIT_BYTES = 1 << 20


def _b3_bounds(n: int, total: int, n_threads: int | None) -> list[int]:
    """Row bounds splitting n messages of `total` bytes over threads for hashing: at most the
    budget, at least B3_SPLIT_BYTES per thread, whole vector passes of 16 rows."""
    t = max(1, min(n_threads or threads(), total // B3_SPLIT_BYTES, -(-n // 16)))
    return [16 * (-(-n // 16) * i // t) for i in range(t)] + [n]


def b3_rows(segments: list[np.ndarray], n_threads: int | None = None) -> np.ndarray:
    """The BLAKE3 digests of n messages, message i the concatenation of row i of each segment
    (uint8 [n, w_s], contiguous bytes within a row, any row stride; at most 8 segments): uint8
    [n, 32], equal to blake3.blake3(b"".join(seg[i] for seg in segments)).digest()."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    if not 1 <= len(segments) <= 8:
        raise ValueError("b3_rows: 1 to 8 segments")
    n = segments[0].shape[0] if segments[0].ndim == 2 else -1
    for g in segments:
        if (g.dtype != np.uint8 or g.ndim != 2 or g.shape[0] != n or g.strides[1] != 1
                and g.shape[1] > 1 or g.strides[0] < 0):
            raise ValueError("b3_rows: segments must be uint8 [n, w] with contiguous rows")
    out = np.empty((n, 32), np.uint8)
    if n == 0:
        return out
    k = len(segments)
    strides = (ctypes.c_int64 * k)(*(g.strides[0] for g in segments))
    widths = (ctypes.c_int64 * k)(*(g.shape[1] for g in segments))
    bounds = _b3_bounds(n, n * sum(g.shape[1] for g in segments), n_threads)

    def run(a: int, b: int) -> int:
        if a >= b:
            return 0
        bases = (ctypes.c_void_p * k)(*(g.ctypes.data + a * g.strides[0] for g in segments))
        return so.b3_rows(k, bases, strides, widths, b - a, out.ctypes.data + 32 * a)
    _split_run(run, bounds, "b3_rows")
    return out


class _ProofArgs(ctypes.Structure):
    """hash.c's b3_proof_args."""
    _fields_ = [("nseg", ctypes.c_int64), ("base", ctypes.c_void_p * 8),
                ("stride", ctypes.c_int64 * 8), ("width", ctypes.c_int64 * 8),
                ("esize", ctypes.c_int64 * 8), ("lo", ctypes.c_int64 * 8),
                ("hi", ctypes.c_int64 * 8), ("n", ctypes.c_int64), ("leaves", ctypes.c_void_p),
                ("idx", ctypes.c_void_p), ("n_leaves", ctypes.c_uint64),
                ("proof", ctypes.c_void_p), ("n_proof", ctypes.c_int64),
                ("prefix", ctypes.c_void_p), ("plen", ctypes.c_int64), ("root", ctypes.c_void_p)]


class Proof:
    """One proof group prepared for b3_proof (proof_prepare): the struct and every array and
    buffer its addresses name, held as long as it is."""

    def __init__(self, args: _ProofArgs, keep: tuple, total: int):
        self.args, self.keep, self.total = args, keep, total


def proof_prepare(segments: list[np.ndarray], ranges: list, idx: np.ndarray, n_leaves: int,
                  proof: np.ndarray, prefix: bytes, root: bytes) -> Proof | None:
    """A Merkle proof group for proof_run: segments as b3_rows takes them (uint8 [n, w_s]
    rows), ranges[s] None or (esize, lo, hi): segment s's rows read as int8 (1) / int16 (2)
    little-endian values that must lie in [lo, hi]; idx int64 [n] the rows' leaf indices,
    strictly increasing, below n_leaves; proof uint8 [k, 32]; root the expected 32 bytes. None
    when the compiled core is unavailable or the inputs are not of that form (the caller then
    takes the route it would take without this)."""
    so = lib()
    k = len(segments)
    if so is None or not 1 <= k <= 8 or len(ranges) != k or len(root) != 32 or len(prefix) > 64:
        return None
    n = segments[0].shape[0] if segments[0].ndim == 2 else 0
    if n < 1 or any(g.dtype != np.uint8 or g.ndim != 2 or g.shape[0] != n or g.strides[0] < 0
                    or (g.strides[1] != 1 and g.shape[1] > 1) for g in segments):
        return None
    # (the indices' order is checked in C, before the walk: out of order -> not passed)
    if (idx.dtype != np.int64 or idx.shape != (n,) or not idx.flags.c_contiguous
            or not 0 < n_leaves < 2**63 or idx[0] < 0 or idx[-1] >= n_leaves):
        return None
    if proof.dtype != np.uint8 or proof.ndim != 2 or proof.shape[1] != 32:
        return None
    proof = np.ascontiguousarray(proof)
    esize, lo, hi = [0] * k, [0] * k, [0] * k
    for s, (g, r) in enumerate(zip(segments, ranges)):
        if r is not None:
            esize[s], lo[s], hi[s] = r
            if esize[s] not in (1, 2) or g.shape[1] % esize[s] or not (
                    -2**63 <= lo[s] <= hi[s] < 2**63):
                return None
    leaves = np.empty((n, 32), np.uint8)
    fixed = bytes(root) + bytes(prefix)  # root, then the prefix: one buffer
    buf = np.frombuffer(fixed + b"\0", np.uint8)  # never empty: valid addresses
    base = buf.ctypes.data
    a = _ProofArgs(k, (ctypes.c_void_p * 8)(*(g.ctypes.data for g in segments)),
                   (ctypes.c_int64 * 8)(*(g.strides[0] for g in segments)),
                   (ctypes.c_int64 * 8)(*(g.shape[1] for g in segments)),
                   (ctypes.c_int64 * 8)(*esize), (ctypes.c_int64 * 8)(*lo),
                   (ctypes.c_int64 * 8)(*hi), n, leaves.ctypes.data, idx.ctypes.data, n_leaves,
                   proof.ctypes.data, proof.shape[0], base + 32, len(prefix), base)
    return Proof(a, (segments, idx, proof, leaves, buf), n * sum(g.shape[1] for g in segments))


def proof_run(w: Proof, n_threads: int | None = None) -> bool:
    """True when every checked value is in its range and the rows' leaves and the proof rebuild
    the expected root (b3_proof); the rows split over threads as b3_rows splits them."""
    so, a = lib(), w.args
    bounds = _b3_bounds(a.n, w.total, n_threads)
    if len(bounds) == 2:
        code = so.b3_proof(ctypes.byref(a), 0, a.n, 1)
    else:
        codes = list(_pool_of(len(bounds) - 1).map(
            lambda lo, hi: so.b3_proof(ctypes.byref(a), lo, hi, 0), bounds[:-1], bounds[1:]))
        code = next((c for c in codes if c), 0) or so.b3_proof(ctypes.byref(a), 0, 0, 1)
    if code < 0:
        if code == -3:
            raise MemoryError("b3_proof: out of memory")
        raise ValueError("b3_proof: inconsistent inputs")
    return code == 0


def b3_many(rows: np.ndarray, n_threads: int | None = None) -> np.ndarray:
    """The BLAKE3 digests of the rows of rows uint8 [n, w] (each row one message): uint8
    [n, 32], equal to blake3.blake3(row).digest() for each row."""
    return b3_rows([rows], n_threads)


def b3_chain(dom: bytes, cur: bytes, tags: bytes, ids: list[int]) -> bytes:
    """The hash chain of hash.c's b3_chain: for each i, cur = BLAKE3(dom || cur || tags[i:i+1]
    || ids[i] as 4 little-endian bytes).digest(); ids below 2^32, one tag byte per id, dom at
    most 27 bytes (each link one 64-byte block)."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    n = len(ids)
    if (len(cur) != 32 or len(tags) != n or len(dom) > 27
            or not uint_ids(ids)):
        raise ValueError("b3_chain: inconsistent inputs")
    a = np.array(ids, dtype="<u4")
    out = ctypes.create_string_buffer(bytes(cur), 32)
    if so.b3_chain(dom, len(dom), tags, a.ctypes.data, n, out):
        raise ValueError("b3_chain: inconsistent inputs")
    return out.raw


def b3_multiproof(idx: np.ndarray, leaves: np.ndarray, n_leaves: int, proof: np.ndarray,
                  prefix: bytes) -> bytes | None:
    """merkle.verify_multiproof's rebuilt root (hash.c): idx int64 [m] sorted distinct indices
    below n_leaves (< 2^63), leaves uint8 [m, 32] their hashes, proof uint8 [k, 32], node hashes
    H(prefix || left || right). None when the proof has too few or too many hashes."""
    so = lib()
    if so is None:
        raise RuntimeError("the compiled core is unavailable")
    m = idx.shape[0]
    if (idx.dtype != np.int64 or idx.ndim != 1 or leaves.shape != (m, 32) or m == 0
            or leaves.dtype != np.uint8 or proof.dtype != np.uint8 or proof.ndim != 2
            or proof.shape[1] != 32 or not 0 < n_leaves < 2**63):
        raise ValueError("b3_multiproof: inconsistent inputs")
    if not (idx[0] >= 0 and idx[-1] < n_leaves and (m == 1 or bool(np.all(idx[1:] > idx[:-1])))):
        raise ValueError("b3_multiproof: indices not sorted, distinct and below n_leaves")
    idx, leaves, proof = (np.ascontiguousarray(a) for a in (idx, leaves, proof))
    root = np.empty(32, np.uint8)
    code = so.b3_multiproof(idx.ctypes.data, leaves.ctypes.data, m, n_leaves, proof.ctypes.data,
                            proof.shape[0], prefix, len(prefix), root.ctypes.data)
    if code == -3:
        raise MemoryError("b3_multiproof: out of memory")
    return root.tobytes() if code == 0 else None

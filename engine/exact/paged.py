"""A paged K/V cache: fixed-size blocks from one pool sized in bytes, a block table per sequence.

KVPool holds every layer's K/V rows for `n_blocks` blocks of `block_size` positions (int8 or int16
rows and fp32 scales, as the profile quantizes them), allocated once: the pool never grows, and
its size is what `serve --kv-cache-mib` gives. PagedCache is a sequence's view of it with the same
interface as SeqCache (k, sk, v, sv indexed by layer give the filled rows [S, ...], append writes
new rows in place), so the model, openings and commitments read it unchanged. A sequence reserves
the blocks a step will write before the step runs (reserve(); False when the pool has too few free
blocks: the scheduler then waits or preempts), so a full pool never fails mid-forward.

Blocks are reference counted: a full block can be shared by sequences with the same prefix
(engine/prefix.py) and is read-only from then on; a sequence only writes its own last block.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_BLOCK = 16  # positions per block


class PoolFull(RuntimeError):
    """Not enough free K/V blocks (the scheduler reserves before a step, so this is a bug)."""


class KVPool:
    def __init__(self, cfg, profile, max_bytes: int, block_size: int = DEFAULT_BLOCK,
                 device=None):
        """A pool of max_bytes on `device` (default: the CPU; the Triton backend's device on a
        GPU, so its kernels read the blocks where they lie). The block lists stay on the host."""
        if block_size < 1:
            raise ValueError("the K/V block size must be >= 1")
        L, nkv, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        kv_dtype = torch.int8 if profile.kv_qmax <= 127 else torch.int16
        self.block_bytes = self.bytes_for(cfg, profile, block_size, block_size)
        n_blocks = int(max_bytes // self.block_bytes)
        if n_blocks < 1:
            raise ValueError(f"a K/V pool of {max_bytes} bytes holds no block of {block_size} "
                             f"positions ({self.block_bytes} bytes)")
        self.block_size, self.n_blocks = block_size, n_blocks
        # K/V rows: memory is only touched as blocks are written (any int bit pattern is a
        # finite value). Scales: zeros, so rows no sequence wrote are finite where a padded read
        # sees them (their weights are 0, and 0 times a finite scale is 0).
        self.device = torch.device(device or "cpu")
        self.k = torch.empty((L, n_blocks, block_size, nkv, d), dtype=kv_dtype,
                             device=self.device)
        self.v = torch.empty_like(self.k)
        self.sk = torch.zeros((L, n_blocks, block_size, nkv), dtype=torch.float32,
                              device=self.device)
        self.sv = torch.zeros_like(self.sk)
        self.refs = np.zeros(n_blocks, dtype=np.int64)
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: low ids first
        self.evictor = None  # prefix cache: frees unreferenced cached blocks on demand

    @staticmethod
    def bytes_for(cfg, profile, positions: int, block_size: int = DEFAULT_BLOCK) -> int:
        """Bytes of the blocks holding `positions` positions."""
        item = 1 if profile.kv_qmax <= 127 else 2
        per = cfg.num_layers * block_size * cfg.num_kv_heads * (2 * cfg.head_dim * item + 8)
        return math.ceil(positions / block_size) * per

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.k, self.v, self.sk, self.sv))

    def blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    def free_blocks(self) -> int:
        """Blocks an allocation can get: free ones and cached ones nobody uses."""
        return len(self._free) + (self.evictor.evictable() if self.evictor is not None else 0)

    def used_blocks(self) -> int:
        return int((self.refs > 0).sum())

    def alloc(self) -> int:
        if not self._free and self.evictor is not None:
            self.evictor.evict_one()
        if not self._free:
            raise PoolFull("no free K/V block")
        b = self._free.pop()
        self.refs[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.refs[b] == 0:  # only a cached block nobody held is taken up again
            self.evictor.idle -= 1
        self.refs[b] += 1

    def decref(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] < 0:
            raise AssertionError(f"K/V block {b} released twice")
        if self.refs[b] == 0:
            if self.evictor is not None and self.evictor.keeps(b):
                self.evictor.idle += 1
            else:
                self._free.append(b)

    def release(self, b: int) -> None:
        """A cached block the prefix cache gave up (refcount 0): back to the free list."""
        if self.refs[b] == 0:
            self._free.append(b)


class _Rows:
    """cache.k (or sk, v, sv): indexed by layer, the sequence's filled rows gathered from its
    blocks [S, ...]; iterates over the layers (what commitments stack)."""

    def __init__(self, cache: "PagedCache", store: torch.Tensor):
        self.cache, self.store = cache, store

    def __getitem__(self, layer: int) -> torch.Tensor:
        c = self.cache
        n = c.filled[layer]
        if n == 0:
            return self.store[layer, :0, 0]
        nb = c.pool.blocks_for(n)
        idx = torch.tensor(c.blocks[:nb], dtype=torch.int64, device=self.store.device)
        rows = self.store[layer].index_select(0, idx)
        return rows.reshape(nb * c.pool.block_size, *rows.shape[2:])[:n]

    def __len__(self) -> int:
        return self.store.shape[0]

    def __iter__(self):
        return (self[l] for l in range(len(self)))


class PagedCache:
    """One sequence's K/V rows in a KVPool (the SeqCache interface)."""

    def __init__(self, pool: KVPool):
        self.pool, self.blocks, self.length = pool, [], 0
        self.filled = [0] * pool.k.shape[0]  # rows written per layer (a step writes layer by layer)
        self.k, self.sk = _Rows(self, pool.k), _Rows(self, pool.sk)
        self.v, self.sv = _Rows(self, pool.v), _Rows(self, pool.sv)

    def reserve(self, n_new: int) -> bool:
        """Make room for n_new more positions; False (nothing taken) when the pool cannot."""
        need = self.pool.blocks_for(self.length + n_new) - len(self.blocks)
        if need <= 0:
            return True
        if need > self.pool.free_blocks():
            return False
        self.blocks += [self.pool.alloc() for _ in range(need)]
        return True

    def attach(self, blocks: list[int], length: int) -> None:
        """Start from shared full blocks (a prefix-cache hit): they are read, never written."""
        if self.blocks or self.length:
            raise ValueError("a prefix can only be attached to an empty cache")
        for b in blocks:
            self.pool.incref(b)
        self.blocks = list(blocks)
        self.length = length
        self.filled = [length] * len(self.filled)

    def append(self, layer: int, k, sk, v, sv) -> None:
        """SeqCache.append: layer's rows for the positions after `length` (a forward step)."""
        if self.filled[layer] != self.length:
            raise ValueError(f"layer {layer} already holds {self.filled[layer]} rows, the cache "
                             f"{self.length}")
        PagedStep([self], [k.shape[0]]).write(layer, k, sk, v, sv)

    def free(self) -> None:
        """Give every block back (a finished, cancelled or preempted sequence)."""
        for b in self.blocks:
            self.pool.decref(b)
        self.blocks, self.length = [], 0
        self.filled = [0] * len(self.filled)


DEFAULT_KV_SHARE = 0.25  # of the memory available at start
DEFAULT_KV_CAP = 4 << 30


def available_memory(device=None) -> int | None:
    """Free memory of a CUDA device (torch.cuda.mem_get_info), else MemAvailable from
    /proc/meminfo (Linux), else None."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_kv_bytes(cfg, profile, max_seqs: int, block_size: int = DEFAULT_BLOCK,
                     device=None) -> int:
    """Room for twice what max_seqs full contexts need (the rest holds cached prefixes), at most
    a quarter of the memory available now on the pool's device and 4 GiB, at least one full
    context."""
    one = KVPool.bytes_for(cfg, profile, cfg.max_position_embeddings, block_size)
    avail = available_memory(device)
    share = DEFAULT_KV_CAP if avail is None else min(int(avail * DEFAULT_KV_SHARE), DEFAULT_KV_CAP)
    return max(min(share, 2 * max_seqs * one), one)


class PagedStep:
    """One forward step over sequences that all live in one pool: the slots their new rows go to
    and the blocks their keys come from, worked out once for every layer. write() puts a layer's
    new K/V rows of the whole step in place in one copy per tensor; padded() gathers a layer's
    keys of some of the sequences as [B, S_max, ...] in one index per tensor (the padding reads
    other rows of the pool: finite values at positions no query sees, so their weights and
    products are exact zeros, as with attention_batch's zero padding)."""

    def __init__(self, caches: list[PagedCache], lengths: list[int]):
        self.caches, self.lengths = caches, lengths
        self.pool = pool = caches[0].pool
        bs = pool.block_size
        slots = []
        for c, n in zip(caches, lengths):
            if pool.blocks_for(c.length + n) > len(c.blocks):
                raise PoolFull(f"{c.length + n} positions need more K/V blocks than were reserved")
            pos = np.arange(c.length, c.length + n)
            slots.append(np.asarray(c.blocks, dtype=np.int64)[pos // bs] * bs + pos % bs)
        self.slots = torch.from_numpy(np.concatenate(slots)).to(pool.device)
        self._gather: dict[tuple, tuple] = {}
        self._tables: dict[int, torch.Tensor] = {}

    @staticmethod
    def of(caches, lengths) -> "PagedStep | None":
        if caches and all(isinstance(c, PagedCache) for c in caches) and all(
                c.pool is caches[0].pool for c in caches):
            return PagedStep(caches, lengths)
        return None

    def write(self, layer: int, k, sk, v, sv) -> None:
        p = self.pool
        for store, x in ((p.k, k), (p.sk, sk), (p.v, v), (p.sv, sv)):
            flat = store[layer].view(-1, *store.shape[3:])
            flat.index_copy_(0, self.slots, x.to(store.dtype))
        for c, n in zip(self.caches, self.lengths):
            c.filled[layer] += n

    def table(self, j: int) -> torch.Tensor:
        """Sequence j's block table (int32, on the pool's device), for the paged kernels."""
        t = self._tables.get(j)
        if t is None:
            t = self._tables[j] = torch.tensor(self.caches[j].blocks, dtype=torch.int32,
                                               device=self.pool.device)
        return t

    def rows(self, layer: int):
        """One layer of the pool viewed as [n_blocks * block_size, ...] rows (k, sk, v, sv): what
        the paged kernels index with a block table."""
        p = self.pool
        return [store[layer].reshape(-1, *store.shape[3:]) for store in (p.k, p.sk, p.v, p.sv)]

    def padded(self, layer: int, which: list[int]):
        """k, sk, v, sv [B, S_max, ...] of sequences `which` (indices into the step's caches),
        with every row each has after this step's write."""
        key = tuple(which)
        if key not in self._gather:
            p = self.pool
            ends = [self.caches[j].length + self.lengths[j] for j in which]
            nb = max(p.blocks_for(e) for e in ends)
            idx = [self.caches[j].blocks[:nb] + [0] * (nb - len(self.caches[j].blocks[:nb]))
                   for j in which]
            self._gather[key] = (torch.tensor(idx, dtype=torch.int64,
                                              device=p.device).reshape(-1), nb)
        idx, nb = self._gather[key]
        bsz, s_max = len(which), nb * self.pool.block_size
        out = []
        for store in (self.pool.k, self.pool.sk, self.pool.v, self.pool.sv):
            rows = store[layer].index_select(0, idx)
            out.append(rows.reshape(bsz, s_max, *rows.shape[2:]))
        return out

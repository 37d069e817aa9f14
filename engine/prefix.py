"""Exact prefix caching: full K/V blocks found again by the hash of every token id before their
end, so requests sharing a prefix (a system prompt, few-shot examples, earlier chat turns) reuse
its K/V rows instead of recomputing them.

The engine is exact and batch-invariant: a position's K/V rows and residual streams depend only on
the token ids up to it, never on what was computed beside them or when. A cached block therefore
holds exactly the rows a fresh run would write, and with it the Merkle leaves of those positions'
residual streams (leaves name their layer and position), which is what the receipt commits. So a
receipt and its opening are the same bytes with the cache on or off (tested, eviction included).

Blocks are kept after their last user leaves and given up least recently used first when the pool
needs room. Requests that ask for prompt logprobs (echo) skip the lookup: they need every prompt
position's logits.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import blake3
import numpy as np

from .exact.paged import KVPool


@dataclass
class Cached:
    block: int
    leaves: list  # [L + 1][block_size] residual leaf hashes of the block's positions


class PrefixCache:
    def __init__(self, pool: KVPool):
        self.pool = pool
        pool.evictor = self
        self._by_hash: OrderedDict[bytes, Cached] = OrderedDict()  # least recently used first
        self._of_block: dict[int, bytes] = {}
        self.idle = 0  # cached blocks no sequence holds (what eviction can free)
        self.lookups = self.hits = self.query_tokens = self.hit_tokens = self.evictions = 0

    def hashes(self, tokens: list[int], n_blocks: int, known: list[bytes] = ()) -> list[bytes]:
        """Chained block hashes: block i's covers every token id of blocks 0..i. known: the
        hashes of the first blocks already computed (only the rest are hashed)."""
        bs, out = self.pool.block_size, list(known[:n_blocks])
        h = out[-1] if out else b"commitllm-prefix-v1"
        for i in range(len(out), n_blocks):
            ids = np.asarray(tokens[i * bs:(i + 1) * bs], dtype="<u4").tobytes()
            h = blake3.blake3(h + ids).digest()
            out.append(h)
        return out

    def match(self, tokens: list[int]) -> tuple[list[Cached], list[bytes]]:
        """The cached blocks of the longest cached prefix of tokens, leaving at least one token
        to compute (its logits pick the next token), and the hashes of those blocks."""
        self.lookups += 1
        self.query_tokens += len(tokens)
        found, hashes = [], self.hashes(tokens, (len(tokens) - 1) // self.pool.block_size)
        for h in hashes:
            c = self._by_hash.get(h)
            if c is None:
                break
            self._by_hash.move_to_end(h)
            found.append(c)
        if found:
            self.hits += 1
            self.hit_tokens += len(found) * self.pool.block_size
        return found, hashes[:len(found)]

    def insert(self, h: bytes, block: int, leaves: list) -> None:
        """Keep a full block under its chained hash (the first one computed stays)."""
        if h in self._by_hash or block in self._of_block:
            return
        self._by_hash[h] = Cached(block, leaves)
        self._of_block[block] = h

    # -- the pool's evictor ------------------------------------------------------------------
    def keeps(self, block: int) -> bool:
        return block in self._of_block

    def evictable(self) -> int:
        return self.idle

    def evict_one(self) -> None:
        for h, c in self._by_hash.items():
            if self.pool.refs[c.block] == 0:
                del self._by_hash[h]
                del self._of_block[c.block]
                self.idle -= 1
                self.pool.release(c.block)
                self.evictions += 1
                return

    def stats(self) -> dict:
        return {"blocks": len(self._by_hash), "lookups": self.lookups, "hits": self.hits,
                "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
                "token_hit_rate": self.hit_tokens / self.query_tokens
                if self.query_tokens else 0.0,
                "hit_tokens": self.hit_tokens, "evictions": self.evictions}

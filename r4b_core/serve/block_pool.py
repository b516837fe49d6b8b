"""Block accounting over a ``PagedKVCache``: free blocks, reference counts and the prefix cache.

Facts learned from vLLM's v1 KV cache manager (block pool, prefix caching), re-derived here:
- a FULL block is identified by a hash of its content chained with its predecessor's hash, so equal hashes
  mean equal prefixes (token ids, and for image positions a digest of the image's pixels after
  preprocessing, since every image token has the same placeholder id);
- a block whose reference count drops to 0 is not wiped: it goes to the tail of the free queue still
  carrying its hash, so a later request with the same prefix can take it back (a hit); allocation takes
  from the head of the queue (the least recently freed), dropping that block's hash first (eviction, LRU);
- only full blocks are shared; a sequence's last, partial block is its own.

Here the hash is BLAKE2b-128 over (parent digest, the block's token ids as int64, the digests of the
images whose first token falls in the block). Everything runs on the engine thread; nothing here touches
tensors, so it is cheap to test on its own.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Sequence

from r4b_core.models.paged_kv_cache import NULL_BLOCK


def block_hashes(token_ids: Sequence[int], block_size: int, image_starts: dict[int, bytes] | None = None,
                 start: int = 0, parent: bytes = b"") -> list[bytes]:
    """Chained digests of the full blocks of ``token_ids`` from block ``start`` (``parent`` = the digest of
    block start - 1). ``image_starts`` maps a position to the digest of the image whose first token is there."""
    hashes: list[bytes] = []
    image_starts = image_starts or {}
    for b in range(start, len(token_ids) // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", token_ids[lo:hi]).tobytes())
        for position in sorted(p for p in image_starts if lo <= p < hi):
            h.update(image_starts[position])
        parent = h.digest()
        hashes.append(parent)
    return hashes


class OutOfBlocksError(RuntimeError):
    """Fewer free blocks than asked for (the scheduler preempts or waits)."""


class BlockPool:
    """Free list, reference counts and the hash -> block map of one pool of ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_count = [0] * num_blocks
        # blocks with ref_count 0, least recently freed first (dict: O(1) removal, ordered)
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict(
            (b, None) for b in range(num_blocks) if b != NULL_BLOCK)
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.hits = self.queries = 0  # blocks found / looked up by ``match``
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free ones, cached or not)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks with reference count 1; evicts the least recently freed cached blocks as needed."""
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            digest = self._hash_of.pop(block, None)
            if digest is not None:
                del self._block_of[digest]
                self.evictions += 1
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes``, each taken (reference count + 1)."""
        found = []
        if self.prefix_caching:
            for digest in hashes:
                block = self._block_of.get(digest)
                if block is None:
                    break
                found.append(block)
        self.queries += len(hashes)
        self.hits += len(found)
        for block in found:
            if self.ref_count[block] == 0:
                del self._free[block]
            self.ref_count[block] += 1
        return found

    def register(self, block: int, digest: bytes) -> None:
        """Record that full ``block`` holds the content ``digest`` (a block with that content already
        cached keeps the entry; this one stays private and is simply freed later)."""
        if self.prefix_caching and digest not in self._block_of and block not in self._hash_of:
            self._block_of[digest] = block
            self._hash_of[block] = digest

    def free(self, blocks: Sequence[int], *, forget: bool = False) -> None:
        """Drop one reference to each block; at 0 it joins the free queue's tail (still cached unless
        ``forget``: a non-finite request's blocks must not be found again). Freed in reverse, so a
        sequence's tail blocks are evicted before its head (they are the least likely to be shared)."""
        for block in reversed(blocks):
            if forget:
                self.uncache(block)
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self._free[block] = None
            elif self.ref_count[block] < 0:
                raise RuntimeError(f"KV block {block} freed more often than taken")

    def uncache(self, block: int) -> None:
        digest = self._hash_of.pop(block, None)
        if digest is not None:
            del self._block_of[digest]

    def reset_prefix_cache(self) -> None:
        self._hash_of.clear()
        self._block_of.clear()

    def usage(self) -> dict[str, int | float]:
        return {"blocks_total": self.num_blocks - 1, "blocks_used": self.num_used, "blocks_cached": self.num_cached,
                "block_size": self.block_size, "prefix_cache_hit_rate": round(self.hits / self.queries, 4)
                if self.queries else 0.0, "prefix_cache_evictions": self.evictions}

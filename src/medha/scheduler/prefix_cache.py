"""Prefix caching: full KV blocks of prompts, kept by the hash of their tokens, shared by later
requests that start with the same tokens (vLLM's automatic prefix caching, SGLang's radix cache).

A block is known by a chained hash: the digest of its tokens and of the block before it, so a
hash names the whole prefix up to the block's end (`block_hashes`). A request's digests cover
its prompt's full blocks, then each block its sampled tokens fill (so a conversation's next
turn finds the previous answer too, and a preempted request its own KV). Per KVP group:

- a block whose KV a request has fully computed is registered under its hash (unless another
  block already holds that prefix: then it stays the request's own);
- a later request whose prompt begins with registered blocks takes them (a reference each) and
  computes only the rest; at least its last token is always computed, in a block of its own,
  so no step ever writes into a shared block;
- a registered block nobody references stays cached, but counts as free: allocation takes the
  truly free blocks first, then evicts cached ones, least recently released first.

Pure Python, like the rest of the scheduler: the engine hashes the token ids, the scheduler
only sees digests.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence

BlockHash = bytes


_PACK = 65_536


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent: BlockHash = b""
) -> tuple[BlockHash, ...]:
    """The chained digest of every full block of `token_ids` (a trailing partial block has
    none): block i's digest covers tokens [0, (i + 1) * block_size). `parent`: the digest of
    the block before `token_ids` when they continue a sequence (its output, as it grows)."""
    # 8 bytes per id whatever the vocabulary (a 1M-token prompt in ~0.1 s), packed 64K ids at
    # a time: each pack holds the GIL, which threads other than a long prompt's want too.
    # sha256: a collision would silently serve another prompt's KV, so no 64-bit hash.
    data = b"".join(
        array("q", token_ids[start : start + _PACK]).tobytes()
        for start in range(0, len(token_ids), _PACK)
    )
    step = 8 * block_size
    digests: list[BlockHash] = []
    for end in range(step, len(data) + 1, step):
        parent = hashlib.sha256(parent + data[end - step : end]).digest()
        digests.append(parent)
    return tuple(digests)


def salted_root(cache_salt: str | None) -> BlockHash:
    """The digest a request's first block chains from: none (b""), or its cache salt's (vLLM's
    `cache_salt`), so that only requests with the same salt share blocks. A tenant's salt
    keeps other tenants from timing which prefixes it has sent (a cache hit is faster)."""
    if cache_salt is None:
        return b""
    return hashlib.sha256(b"medha cache salt\0" + cache_salt.encode("utf-8")).digest()


class PrefixCache:
    """The registered blocks of one KVP group, their references, and the unreferenced ones
    in eviction order."""

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def registered(self) -> Iterator[tuple[BlockHash, int]]:
        """(digest, block) of every registered block."""
        return iter(self._block_of.items())

    def lookup(self, digest: BlockHash) -> int | None:
        return self._block_of.get(digest)

    def is_evictable(self, block: int) -> bool:
        """Cached and used by nobody: counted as free."""
        return block in self._evictable

    def acquire(self, block: int) -> None:
        """A request takes a registered block."""
        self._refs[block] += 1
        self._evictable.pop(block, None)

    def register(self, digest: BlockHash, block: int) -> bool:
        """`block`, held by one request, now holds the computed KV of prefix `digest`. False
        if another block already holds that prefix (this one then stays private)."""
        if digest in self._block_of or block in self._hash_of:
            return False
        self._block_of[digest] = block
        self._hash_of[block] = digest
        self._refs[block] = 1
        return True

    def release(self, block: int) -> bool:
        """A request lets go of `block`. False if the block is not a registered one (the
        caller frees it)."""
        refs = self._refs.get(block)
        if refs is None:
            return False
        self._refs[block] = refs - 1
        if refs == 1:
            self._evictable[block] = None  # most recently released last
        return True

    def evict(self) -> int | None:
        """Forget the least recently released unreferenced block and return it (now free),
        or None if every registered block is in use."""
        if not self._evictable:
            return None
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        del self._refs[block]
        return block

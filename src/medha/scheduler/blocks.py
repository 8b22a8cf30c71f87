"""Paged KV block accounting: one allocator per KVP group, handing out explicit block ids.

The engine's KV cache uses these ids as indices into its per-group block pools, so an id is
owned by at most one request at a time; freeing an id twice is a bug. With `check` on, every
freed id is verified (and a bad one raises); that costs a set update per block, which for a
long prompt's reservation is most of a scheduling call, so the scheduler runs it only when
asked (SchedulerConfig.check_blocks; the test suite turns it on). Without it, a free that would
hold more blocks than exist still raises.
"""

from __future__ import annotations

from collections.abc import Sequence

from medha.scheduler.prefix_cache import PrefixCache


class OutOfBlocksError(RuntimeError):
    """Internal: an allocation was attempted without checking `num_free` first."""


class BlockAllocator:
    """Free-list allocator for the `num_blocks` blocks of one KVP group."""

    def __init__(self, num_blocks: int, check: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Popped from the end: low ids first, which keeps small test traces readable.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._allocated: set[int] | None = set() if check else None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            raise OutOfBlocksError(f"asked for {count} blocks, {len(self._free)} free")
        split = len(self._free) - count
        taken = self._free[split:]
        del self._free[split:]
        if self._allocated is not None:
            self._allocated.update(taken)
        return taken

    def free(self, blocks: Sequence[int]) -> None:
        if self._allocated is None:
            if len(self._free) + len(blocks) > self.num_blocks:
                raise ValueError(
                    f"freeing blocks that are not allocated: {len(blocks)} blocks, only "
                    f"{self.num_used} are in use"
                )
            self._free.extend(blocks)
            return
        unique = set(blocks)
        if len(unique) != len(blocks) or not unique <= self._allocated:
            stray = sorted(unique - self._allocated) or "a duplicate"
            raise ValueError(f"freeing blocks that are not allocated: {stray}")
        self._allocated -= unique
        self._free.extend(blocks)


class CachingAllocator:
    """One KVP group's blocks: a free list, plus the prefix cache whose unreferenced blocks
    count as free and are evicted when the free list runs out."""

    def __init__(self, num_blocks: int, check: bool = True) -> None:
        self.blocks = BlockAllocator(num_blocks, check)
        self.cache = PrefixCache()

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def num_free(self) -> int:
        return self.blocks.num_free + self.cache.num_evictable

    def allocate(self, count: int) -> list[int]:
        short = count - self.blocks.num_free
        evicted: list[int] = []
        while short > 0:
            block = self.cache.evict()
            if block is None:
                break
            evicted.append(block)
            short -= 1
        # Evicted blocks go back through the allocator, which checks them like any freed id.
        if evicted:
            self.blocks.free(evicted)
        return self.blocks.allocate(count)

    def free(self, blocks: Sequence[int]) -> None:
        """Free a request's blocks, given in token order. Cached ones are released last block
        first (vLLM does the same): eviction then takes a prefix's tail before its head, and
        what stays cached is still a usable prefix."""
        if not self.cache.num_cached:  # nothing cached (prefix caching off): no lookups
            self.blocks.free(blocks)
            return
        private = [block for block in reversed(blocks) if not self.cache.release(block)]
        if private:
            self.blocks.free(private)


class BlockPool:
    """The allocators of all KVP groups, each with its prefix cache
    (medha.scheduler.prefix_cache): cached blocks nobody uses count as free."""

    def __init__(self, num_groups: int, blocks_per_group: int, check: bool = True) -> None:
        self.groups = [CachingAllocator(blocks_per_group, check) for _ in range(num_groups)]

    def cache(self, group: int) -> PrefixCache:
        return self.groups[group].cache

    def num_free(self, group: int) -> int:
        return self.groups[group].num_free

    def allocate(self, group: int, count: int) -> list[int]:
        return self.groups[group].allocate(count)

    def free(self, group: int, blocks: Sequence[int]) -> None:
        self.groups[group].free(blocks)

    @property
    def free_counts(self) -> tuple[int, ...]:
        return tuple(allocator.num_free for allocator in self.groups)

    @property
    def total_counts(self) -> tuple[int, ...]:
        return tuple(allocator.num_blocks for allocator in self.groups)

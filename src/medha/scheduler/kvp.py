"""KVP placement: which KVP group holds which tokens of a request, and its KV blocks there.

With M = max tokens per KVP group, tokens [0, M) live on the request's first group, [M, 2M) on
the next group (cyclically), and so on. A chunk never straddles a boundary, so every step appends
its new KV to exactly one group (the last one holding the request), while all earlier groups
attend to their whole shard. With M = None a request lives on one group; several groups then act
as data-parallel replicas for short traffic.
"""

from __future__ import annotations

from collections.abc import Sequence

from medha.scheduler.blocks import BlockPool
from medha.scheduler.config import SchedulerConfig
from medha.scheduler.cost import BatchCostModel
from medha.scheduler.plan import KvShard
from medha.scheduler.request import SchedRequest


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shard_sizes(kv_tokens: int, groups: int, limit: int | None) -> tuple[int, ...]:
    """Tokens of a request's cached KV (`kv_tokens` in all) on each of its first `groups`
    groups, `limit` per group: every group but the last is full (DESIGN section 8), the last
    holds the rest (more than `limit` only for lengths past what the groups can hold, which
    the prefill-time table's walk may reach when it extends itself)."""
    if groups == 1:
        return (kv_tokens,)
    if limit is None:
        raise ValueError("a request spans several KVP groups only with a per-group token limit")
    rest = kv_tokens - (groups - 1) * limit
    if rest < 0:
        raise ValueError(f"{kv_tokens} cached tokens do not reach group {groups} of {limit} each")
    return (limit,) * (groups - 1) + (rest,)


class KvpLayout:
    """Token-to-group arithmetic plus block reservation for one scheduler configuration."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.num_groups = config.kvp_groups
        self.limit = config.max_tokens_per_kvp_group
        self.block_size = config.block_size
        self.blocks_per_group = config.num_blocks

    def group_index(self, position: int) -> int:
        """Index into a request's `groups` of the group holding token `position`."""
        return 0 if self.limit is None else position // self.limit

    def tokens_to_boundary(self, position: int) -> int | None:
        """Tokens from `position` up to the next group boundary (None: no boundary)."""
        if self.limit is None:
            return None
        return self.limit - position % self.limit

    def blocks_by_group_index(self, tokens: int) -> list[int]:
        """Blocks needed on each group index to hold positions [0, tokens)."""
        if self.limit is None:
            return [_ceil_div(tokens, self.block_size)]
        counts = []
        for start in range(0, tokens, self.limit):
            counts.append(_ceil_div(min(self.limit, tokens - start), self.block_size))
        return counts

    def max_request_tokens(self) -> int:
        """The most tokens of KV one request can ever hold (the largest that can_ever_fit)."""
        per_group = self.blocks_per_group * self.block_size
        if self.limit is None or self.limit > per_group:
            # One group: past `per_group` even the first group is full before its limit.
            return per_group
        return self.num_groups * self.limit

    def can_ever_fit(self, tokens: int) -> bool:
        """Whether `tokens` of KV fit the groups a request could use, with nothing else there."""
        counts = self.blocks_by_group_index(tokens)
        return len(counts) <= self.num_groups and max(counts) <= self.blocks_per_group

    def group_sequence(self, first: int, count: int) -> tuple[int, ...]:
        return tuple((first + offset) % self.num_groups for offset in range(count))

    def feasible_first_groups(
        self, tokens: int, pool: BlockPool, request: SchedRequest | None = None
    ) -> list[int]:
        """First groups from which a reservation of `tokens` finds free blocks on every group
        it spans; for `request`, counting the prefix cache blocks it would take there (they
        need no free block, and one nobody uses is no longer free once taken)."""
        counts = self.blocks_by_group_index(tokens)
        hashed = request is not None and request.reads_cache and bool(request.block_hashes)
        if self.limit is None and not hashed:
            return [g for g in range(self.num_groups) if pool.num_free(g) >= counts[0]]
        feasible = []
        for first in range(self.num_groups):
            groups = self.group_sequence(first, len(counts))
            needed = list(counts)
            free = [pool.num_free(group) for group in groups]
            if all(n <= f for n, f in zip(needed, free, strict=True)):
                feasible.append(first)  # a hit only lowers what it needs: no need to look
                continue
            if request is not None and hashed:
                for index, block in enumerate(self.prefix_hit(request, first, pool)):
                    group_index = self.group_index(index * self.block_size)
                    needed[group_index] -= 1
                    free[group_index] -= int(pool.cache(groups[group_index]).is_evictable(block))
            if all(n <= f for n, f in zip(needed, free, strict=True)):
                feasible.append(first)
        return feasible

    def prefix_hit(self, request: SchedRequest, first: int, pool: BlockPool) -> list[int]:
        """The cached blocks a request placed from group `first` would start with: its longest
        run of leading blocks found in the prefix cache of the groups that would hold
        them. Never all of its known tokens: the last one is always computed (its logits
        sample), in a block of its own, so no step writes into a shared block."""
        if not request.reads_cache:
            return []
        return self._hit(request.block_hashes, request.known_tokens, first, pool)

    def cached_tokens(self, hashes: Sequence[bytes], known_tokens: int, pool: BlockPool) -> int:
        """The most tokens of a request's prefix found cached, over every first group."""
        if not hashes:
            return 0
        return self.block_size * max(
            len(self._hit(hashes, known_tokens, first, pool)) for first in range(self.num_groups)
        )

    def _hit(
        self, hashes: Sequence[bytes], known_tokens: int, first: int, pool: BlockPool
    ) -> list[int]:
        most = min(len(hashes), (known_tokens - 1) // self.block_size)
        blocks: list[int] = []
        for index in range(most):
            group = (first + self.group_index(index * self.block_size)) % self.num_groups
            block = pool.cache(group).lookup(hashes[index])
            if block is None:
                break
            blocks.append(block)
        return blocks

    def hit_placement(
        self, request: SchedRequest, first: int, pool: BlockPool
    ) -> tuple[list[int], tuple[int, ...]]:
        """The cached blocks a queued request placed from `first` starts with, and the groups
        its first chunk runs on: past a hit that reaches beyond a group boundary, those up to
        the group it appends to."""
        hit = self.prefix_hit(request, first, pool)
        return hit, self.group_sequence(first, self.group_index(len(hit) * self.block_size) + 1)

    def choose_first(
        self,
        request: SchedRequest,
        firsts: Sequence[int],
        pool: BlockPool,
        pending: Sequence[tuple[float, int]],
        cost: BatchCostModel,
    ) -> int:
        """The first group for a queued request: the least pending prefill work (then the
        fewest residents), less the work its prefix cache hit there saves (so a tiny shared
        prefix, a system prompt, does not pin every request to one replica)."""

        def key(first: int) -> tuple[float, int]:
            seconds, residents = pending[first]
            if request.block_hashes:
                hit = len(self.prefix_hit(request, first, pool)) * self.block_size
                if hit:
                    known = request.known_tokens
                    seconds -= cost.prefill_time(known) - cost.remaining_prefill_time(hit, known)
            return seconds, residents

        return min(firsts, key=key)

    def reserve(
        self, request: SchedRequest, first: int, pool: BlockPool, hit: Sequence[int] = ()
    ) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """Bulk reservation: blocks for all of `request.prefill_len` tokens, on every group the
        prefill will reach (incremental allocation can deadlock several long prompts). The
        first ones are `hit`, cached blocks (`prefix_hit`): taken before anything is
        allocated, which could otherwise evict them."""
        counts = self.blocks_by_group_index(request.prefill_len)
        request.groups = self.group_sequence(first, len(counts))
        reused: list[list[int]] = [[] for _ in counts]
        for index, block in enumerate(hit):
            group_index = self.group_index(index * self.block_size)
            pool.cache(request.groups[group_index]).acquire(block)
            reused[group_index].append(block)
        request.registered_blocks = len(hit)
        request.block_tables = tuple(
            taken + pool.allocate(group, count - len(taken))
            for group, count, taken in zip(request.groups, counts, reused, strict=True)
        )
        return tuple(
            (group, tuple(table))
            for group, table in zip(request.groups, request.block_tables, strict=True)
        )

    def group_needing_block(self, request: SchedRequest, position: int) -> int | None:
        """The group that must allocate a block before token `position` can be appended, or
        None when the block holding it is already allocated."""
        if self.limit is None:  # fast path: one group holds everything
            if position // self.block_size < len(request.block_tables[0]):
                return None
            return request.groups[0]
        index = position // self.limit
        if index >= len(request.groups):
            # The decode crosses into the next group: onboard it.
            return (request.groups[0] + index) % self.num_groups
        local = position - index * self.limit
        if local // self.block_size < len(request.block_tables[index]):
            return None
        return request.groups[index]

    def append_block(self, request: SchedRequest, position: int, block: int) -> None:
        index = self.group_index(position)
        if index == len(request.groups):  # onboarding the next group: rare, so rebuild
            request.groups = (*request.groups, (request.groups[0] + index) % self.num_groups)
            request.block_tables = (*request.block_tables, [])
        request.block_tables[index].append(block)

    def shards(self, request: SchedRequest, query_start: int) -> tuple[KvShard, ...]:
        """KV held per active group before a step whose queries start at `query_start`."""
        if self.limit is None:
            return (KvShard(request.groups[0], 0, query_start),)
        last = query_start // self.limit
        shards = [
            KvShard(request.groups[index], index * self.limit, (index + 1) * self.limit)
            for index in range(last)
        ]
        shards.append(KvShard(request.groups[last], last * self.limit, query_start))
        return tuple(shards)

    def active_groups(self, request: SchedRequest, query_start: int) -> tuple[int, ...]:
        """The groups a step starting at `query_start` runs on."""
        if self.limit is None:
            return request.groups
        return request.groups[: query_start // self.limit + 1]

    def register_computed(self, request: SchedRequest, pool: BlockPool) -> None:
        """Put the request's hashed blocks whose KV is now computed into the prefix cache."""
        full = min(len(request.block_hashes), request.computed // self.block_size)
        for index in range(request.registered_blocks, full):
            position = index * self.block_size
            group_index = self.group_index(position)
            local = (position - group_index * (self.limit or 0)) // self.block_size
            block = request.block_tables[group_index][local]
            pool.cache(request.groups[group_index]).register(request.block_hashes[index], block)
        request.registered_blocks = max(request.registered_blocks, full)

    def release(self, request: SchedRequest, pool: BlockPool) -> None:
        """Give back every block the request holds."""
        for group, table in zip(request.groups, request.block_tables, strict=True):
            pool.free(group, table)
        request.groups = ()
        request.block_tables = ()

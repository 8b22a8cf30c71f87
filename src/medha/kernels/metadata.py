"""What one attention call needs to know about the ragged batch it runs over.

A step's batch is a flat run of query tokens from several sequences: prefill chunks (many tokens)
and decodes (one token) side by side. Every layer of the step shares one AttentionMetadata.

Positions are ABSOLUTE token positions in each sequence. A query at position p sees the cached
keys at positions <= p. That single rule covers:
- a prefill chunk attending causally to its cached prefix and to itself,
- a decode token attending to everything before it,
- a KVP shard holding positions [kv_start, kv_start + kv_len) that lie wholly before the queries
  (an earlier KVP group): every key is visible, i.e. non-causal attention over the shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    q_lens: tuple[int, ...]
    """Query tokens of each sequence, in batch order."""
    q_start_pos: tuple[int, ...]
    """Absolute position of each sequence's first query token."""
    kv_lens: tuple[int, ...]
    """Keys this shard holds for each sequence AFTER this step's append."""
    kv_start_pos: tuple[int, ...]
    """Absolute position of each sequence's first key in this shard (0 without KVP)."""
    block_ids: torch.Tensor
    """int64 [total blocks]: the block ids of every sequence's keys, in position order, one
    sequence after the other (sequence i's are [block_starts[i], block_starts[i + 1])). Ragged,
    not a table padded to the longest sequence: next to a 1M-token document, 255 short
    requests would pad to 65,536 blocks each, 128 MiB and most of a second of host time per
    step."""
    slot_mapping: torch.Tensor
    """int64 [num_query_tokens]: flat KV slot (block * block_size + offset) each query token's
    new key/value is written to, or -1 when this shard does not store it (KVP: not the last group)."""
    block_size: int
    cu_q_lens: tuple[int, ...]
    """Prefix sums of q_lens, length num_seqs + 1."""
    block_starts: tuple[int, ...]
    """Prefix sums of the block table lengths, length num_seqs + 1: offsets into block_ids."""
    scratch: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Per-step values that backends derive once and every layer reuses (masks, gathers)."""

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return self.cu_q_lens[-1]

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.q_lens)

    @classmethod
    def build(
        cls,
        *,
        q_lens: Sequence[int],
        q_start_pos: Sequence[int],
        kv_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        kv_start_pos: Sequence[int] | None = None,
        appends: Sequence[bool] | None = None,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Build the metadata of a ragged batch from plain Python lists.

        `appends[i]` says whether this shard stores sequence i's new keys (default: yes); they go
        at shard offsets [kv_len - q_len, kv_len).
        """
        n = len(q_lens)
        if not (len(q_start_pos) == len(kv_lens) == len(block_tables) == n):
            raise ValueError("q_lens, q_start_pos, kv_lens and block_tables differ in length")
        kv_start = tuple(kv_start_pos) if kv_start_pos is not None else (0,) * n
        appends = tuple(appends) if appends is not None else (True,) * n
        cu = [0]
        slots: list[int] = []
        for i in range(n):
            q, kv, table = q_lens[i], kv_lens[i], block_tables[i]
            if q < 1:
                raise ValueError(f"sequence {i} has {q} query tokens")
            if -(-kv // block_size) > len(table):
                raise ValueError(
                    f"sequence {i} holds {kv} keys but its block table has {len(table)} blocks"
                )
            cu.append(cu[-1] + q)
            if appends[i]:
                if kv < q:
                    raise ValueError(f"sequence {i} appends {q} keys but holds only {kv}")
                first = kv - q
                slots.extend(
                    table[off // block_size] * block_size + off % block_size
                    for off in range(first, kv)
                )
            else:
                slots.extend([-1] * q)
        starts = [0]
        flat: list[int] = []
        for table in block_tables:
            flat.extend(table)
            starts.append(len(flat))
        return cls(
            q_lens=tuple(q_lens),
            q_start_pos=tuple(q_start_pos),
            kv_lens=tuple(kv_lens),
            kv_start_pos=kv_start,
            block_ids=torch.tensor(flat, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_size=block_size,
            cu_q_lens=tuple(cu),
            block_starts=tuple(starts),
        )

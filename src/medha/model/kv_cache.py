"""The paged KV cache: per-layer key and value block pools.

Which blocks belong to which sequence is decided elsewhere (the scheduler's block allocator, pure
Python); this object only owns the memory, addressed by block id.
"""

from __future__ import annotations

import torch

from medha.kernels.layout import new_kv_pool
from medha.model.arch import ModelArch


class KVCache:
    """K and V pools of shape [num_blocks, block_size, kv_heads, head_dim] for each layer.

    That is the shape every attention backend indexes; the memory under it is head-major,
    [kv_heads, num_blocks, block_size, head_dim], so one kv head's keys over consecutive blocks
    are one contiguous [tokens, head_dim] matrix. A decode reads them as a plain matrix product
    or stream (measured on this 2-core CPU: CPU flash attention 0.32 -> 0.21 ms per layer over
    1K tokens of SmolLM2's 3 kv heads, warm) instead of 3 rows of 256 bytes every 768.
    """

    def __init__(
        self,
        arch: ModelArch,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layers: range | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers = layers if layers is not None else range(arch.num_layers)
        self.k = [self._pool(arch, dtype, device) for _ in self.layers]
        self.v = [self._pool(arch, dtype, device) for _ in self.layers]

    def _pool(
        self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        return new_kv_pool(
            self.num_blocks, self.block_size, arch.num_kv_heads, arch.head_dim, dtype, device
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pools of model layer `index` (an absolute layer number)."""
        i = index - self.layers.start
        return self.k[i], self.v[i]

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_block(
        arch: ModelArch, block_size: int, dtype: torch.dtype, num_layers: int
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * arch.num_kv_heads * arch.head_dim * element

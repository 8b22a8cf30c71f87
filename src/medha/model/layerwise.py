"""A model step that may stop between decoder layers and carry on later.

On a slow executor (a CPU) one iteration that extends a long prompt takes a few hundred ms, and
a short request that arrives just after it started waits for all of it before its own prefill
can begin. A step paused between layers keeps its hidden states (a few KB per token); other
steps may run meanwhile, since they read and write only their own sequences' KV blocks, and the
step then resumes at the layer where it stopped. The result is bitwise the uninterrupted one:
the same operations on the same inputs, in the same order. (`ModelRunner.split_step` cuts a
paused step in two, e.g. to finish its decodes first; each part is then a smaller batch, which
changes float rounding as any change of batch does.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from medha.kernels import AttentionFn, AttentionMetadata
from medha.model.kv_cache import KVCache
from medha.model.llama import LlamaForCausalLM, PartialCombiner
from medha.model.rope import Rotation

if TYPE_CHECKING:
    from medha.model.runner import StepSeq


@dataclass(eq=False)
class LayerwiseStep:
    """One step's state between layers: made by `ModelRunner.start_step` (or `split_step`)."""

    model: LlamaForCausalLM
    kv_cache: KVCache
    meta: AttentionMetadata
    attention: AttentionFn
    combine: PartialCombiner | None
    logits_indices: torch.Tensor | None
    hidden: torch.Tensor
    rotation: Rotation
    seqs: tuple[StepSeq, ...]
    all_logits: bool
    next_layer: int = 0
    """Index (in the model's layer order) of the next layer to run."""

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def done(self) -> bool:
        return self.next_layer == self.num_layers

    @torch.inference_mode()
    def advance(self, should_pause: Callable[[], bool] | None = None) -> bool:
        """Run layers up to the last, or until `should_pause()` (asked after every layer but
        the last) says stop. True once every layer has run."""
        layers = list(self.model.model.layers.values())
        while self.next_layer < len(layers):
            layer = layers[self.next_layer]
            self.hidden = layer(
                self.hidden, self.rotation, self.kv_cache, self.meta, self.attention, self.combine
            )
            self.next_layer += 1
            if should_pause is not None and not self.done and should_pause():
                return False
        return True

    @torch.inference_mode()
    def logits(self) -> torch.Tensor:
        """The step's logits (fp32), once every layer has run."""
        if not self.done:
            raise RuntimeError(f"the step stopped after layer {self.next_layer - 1}")
        return self.model.head(self.hidden, self.logits_indices)

    def run(self) -> torch.Tensor:
        """Every remaining layer, then the logits."""
        self.advance()
        return self.logits()

"""Linear projections packed for fast few-row matmuls, with Hugging Face parameter names kept.

A decode step multiplies ONE row by every weight matrix: a matrix-vector product whose time is
the time the BLAS takes to read the weights. On CPU that depends on the weight's memory layout
(MKL, fp32, AMD EPYC, one thread, weights read from DRAM):

- input-major, W^T stored [in, out] (the row times W^T sums weight rows): 19-25 GB/s when the
  output is at least as wide as the input (q/k/v, gate/up, the LM head);
- output-major, HF's [out, in] (one dot product per output): 13-14 GB/s for in = 576, but
  19-20 GB/s for the long rows of a down projection (in = 1536 > out), where input-major drops
  to 14 GB/s.

So a projection whose output is at least as wide as its input is stored input-major; the others
keep HF's layout. Projections that read the same input (q/k/v, gate/up) share one buffer and
one matmul: fewer calls, and a wider input-major output reads faster still. Large-M (prefill)
matmuls run at the same speed in either layout.

MKL runs an fp32 matrix-vector product on one thread. With more torch threads, a few-row fp32
product is split into a batched matmul, one slice of the reduction (input-major) or of the
outputs (output-major) per thread, which torch runs in parallel: 1.2-1.4x faster on two threads.
bf16 products are not split: oneDNN already spreads them over the threads, and the split's bf16
partial sums cost a second rounding and time (SmolLM2-135M's four projection shapes, 30 copies
each so that the weights come from DRAM, two threads, AVX-512 BF16: 0.58 against 0.49 ms per
layer for one row, 0.67 against 0.55 for four, 0.98 against 0.77 for sixteen; whole steps of 1
to 16 decodes over 300 tokens, 3-5% less time: 34.0 against 32.9 ms for one).

A model packs all its projections into consecutive slices of one buffer, in the order a step
reads them, on huge pages where the OS allows (`pack_in_read_order`, `medha.model.weight_arena`).

The nn.Linear modules stay and their weights become views of the packed buffer: parameter names
and shapes are HF's (loading, state_dict, tensor-parallel slicing by name), nothing is stored
twice, and writing a parameter in place writes the packed buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medha.model.weight_arena import allocate_arena

# Up to this many rows a matmul is bound by reading the weights: split it across threads.
MAX_SPLIT_ROWS = 16


class PackedProjection:
    """y = x @ [W_1; W_2; ...]^T + [b_1, b_2, ...]: the outputs of `linears` (which share an
    input) side by side, computed from one packed buffer once `pack()` has run."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        if not linears:
            raise ValueError("a projection needs at least one linear layer")
        in_features = {m.in_features for m in linears}
        if len(in_features) != 1:
            raise ValueError(f"packed linears must share their input size, got {in_features}")
        self.linears = tuple(linears)
        self.in_features = linears[0].in_features
        self.out_features = tuple(m.out_features for m in linears)
        self.input_major = sum(self.out_features) >= self.in_features
        self.weight: torch.Tensor | None = None
        """[in, out] (input-major) or [out, in]; None until packed."""
        self.bias: torch.Tensor | None = None
        self._packed_ptr = 0

    @property
    def packed_numel(self) -> int:
        return self.in_features * sum(self.out_features)

    def pack(self, copy: bool = True, storage: torch.Tensor | None = None) -> None:
        """Make the linears' weights (and biases) views of one buffer, copying their current
        values in (or, with `copy=False`, leaving them uninitialised for a loader to fill).
        The buffer is `storage` (flat, `packed_numel` elements) if given, else a new one."""
        first = self.linears[0].weight
        total = sum(self.out_features)
        shape = (self.in_features, total) if self.input_major else (total, self.in_features)
        if storage is None:
            buffer = torch.empty(shape, dtype=first.dtype, device=first.device)
        else:
            buffer = storage.view(shape)
        has_bias = [m.bias is not None for m in self.linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("packed linears must all have a bias or none")
        bias = torch.empty(total, dtype=first.dtype, device=first.device) if all(has_bias) else None
        offset = 0
        with torch.no_grad():
            for linear, width in zip(self.linears, self.out_features, strict=True):
                if self.input_major:
                    view = buffer[:, offset : offset + width].t()
                else:
                    view = buffer[offset : offset + width]
                if copy:
                    view.copy_(linear.weight)
                linear.weight = nn.Parameter(view, requires_grad=False)
                if bias is not None and linear.bias is not None:
                    if copy:
                        bias[offset : offset + width].copy_(linear.bias)
                    linear.bias = nn.Parameter(bias[offset : offset + width], requires_grad=False)
                offset += width
        self.weight, self.bias = buffer, bias
        self._packed_ptr = self.linears[0].weight.data_ptr()

    @property
    def is_packed(self) -> bool:
        # Moving the module (`.to(...)`) swaps the parameters' storage: the buffer is then stale.
        return self.weight is not None and self.linears[0].weight.data_ptr() == self._packed_ptr

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] -> [rows, sum(out_features)]."""
        weight = self.weight
        if weight is None or self.linears[0].weight.data_ptr() != self._packed_ptr:
            outs = [F.linear(x, m.weight, m.bias) for m in self.linears]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        rows = x.shape[0]
        splits = _thread_splits(x)
        if self.input_major:
            return self._input_major(x, weight, rows, splits)
        return self._output_major(x, weight, rows, splits)

    def _input_major(
        self, x: torch.Tensor, weight: torch.Tensor, rows: int, splits: int
    ) -> torch.Tensor:
        if splits > 1 and self.in_features % splits == 0:
            # Thread t multiplies input slice t by weight rows slice t; the partial sums add up.
            part = self.in_features // splits
            xs = x.reshape(rows, splits, part).transpose(0, 1)
            y = torch.bmm(xs, weight.view(splits, part, -1)).sum(dim=0)
            return y if self.bias is None else y.add_(self.bias)
        if self.bias is None:
            return torch.mm(x, weight)
        return torch.addmm(self.bias, x, weight)

    def _output_major(
        self, x: torch.Tensor, weight: torch.Tensor, rows: int, splits: int
    ) -> torch.Tensor:
        out = weight.shape[0]
        if splits > 1 and out % splits == 0:
            # Thread t computes output slice t.
            blocks = weight.view(splits, out // splits, self.in_features).transpose(1, 2)
            y = torch.bmm(x.expand(splits, rows, self.in_features), blocks)
            y = y.transpose(0, 1).reshape(rows, out)
            return y if self.bias is None else y.add_(self.bias)
        return F.linear(x, weight, self.bias)


def _thread_splits(x: torch.Tensor) -> int:
    """How many per-thread slices a product with input `x` is split into (see the module
    docstring): all the threads for a few-row fp32 product on a CPU, else 1."""
    if x.is_cpu and x.dtype == torch.float32 and x.shape[0] <= MAX_SPLIT_ROWS:
        return torch.get_num_threads()
    return 1


def pack_in_read_order(projections: Sequence[PackedProjection], copy: bool = True) -> None:
    """Pack `projections` (all of one dtype and device) into consecutive slices of one
    `allocate_arena` buffer, in the order given: the order a step reads them."""
    if not projections:
        return
    first = projections[0].linears[0].weight
    for projection in projections:
        weight = projection.linears[0].weight
        if weight.dtype != first.dtype or weight.device != first.device:
            raise ValueError(
                f"projections packed together must share dtype and device: {weight.dtype} on "
                f"{weight.device} vs {first.dtype} on {first.device}"
            )
    arena = allocate_arena(sum(p.packed_numel for p in projections), first.dtype, first.device)
    offset = 0
    for projection in projections:
        size = projection.packed_numel
        projection.pack(copy, arena[offset : offset + size])
        offset += size

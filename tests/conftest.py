"""Test-wide settings: the scheduler verifies every KV block id it frees (see
medha.scheduler.blocks), so a double free anywhere in the suite fails loudly.

Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_triton_attention.py).
The switch must be on before triton is first imported, by any test module (transformers imports
it), because triton.language's own @jit helpers read it at import; hence here. Automatic backend
selection never picks Triton on CPU, so other tests are unaffected.
"""

import os

import torch

os.environ.setdefault("MEDHA_CHECK_BLOCKS", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

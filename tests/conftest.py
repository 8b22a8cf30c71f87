"""Test-wide settings: the scheduler verifies every KV block id it frees (see
medha.scheduler.blocks), so a double free anywhere in the suite fails loudly."""

import os

os.environ.setdefault("MEDHA_CHECK_BLOCKS", "1")

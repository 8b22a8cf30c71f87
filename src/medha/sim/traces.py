"""Request-length traces: token counts of real requests, and where to find them.

Three traces from the MIT-licensed Vidur simulator (see `medha/sim/data/README.md`): ShareGPT
chats, arXiv summarization and Azure conversations. The full files live outside the package;
they are looked up, in this order, in

1. `$MEDHA_TRACES_DIR` (an error if it is set and lacks the file: never a silent fallback),
2. `../shared/data/traces` relative to the repository root (a source checkout),
3. the 400-row samples bundled in `medha/sim/data` (tests, offline smoke runs).

`TraceLengths.is_sample` says which one was used, so reports can say so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medha.errors import MedhaError
from medha.sim.csv_file import csv_rows

TRACE_FILES: dict[str, str] = {
    "sharegpt": "sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
    "arxiv": "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    "conv": "splitwise_conv.csv",
}
"""Workload name -> trace file name."""

DEFAULT_MAX_TOTAL_TOKENS: dict[str, int | None] = {"sharegpt": 8192, "arxiv": None, "conv": None}
"""The paper caps ShareGPT requests at 8K tokens (prompt + output); the others are uncapped."""

TRACES_ENV = "MEDHA_TRACES_DIR"
BUNDLED_DIR = Path(__file__).resolve().parent / "data"
_REPO_TRACES_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "traces"


class TraceError(MedhaError, ValueError):
    """A trace file is missing or malformed."""


@dataclass(frozen=True)
class TraceLengths:
    """Prompt and output token counts of a trace's requests, row by row."""

    name: str
    source: Path
    prompt_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    is_sample: bool
    """True when read from the bundled 400-row sample rather than the full trace."""

    def __len__(self) -> int:
        return len(self.prompt_tokens)


def trace_path(name: str) -> tuple[Path, bool]:
    """(path of the trace file for workload `name`, whether it is the bundled sample)."""
    if name not in TRACE_FILES:
        raise TraceError(f"unknown trace {name!r} (known: {', '.join(TRACE_FILES)})")
    file_name = TRACE_FILES[name]
    configured = os.environ.get(TRACES_ENV)
    if configured:
        path = Path(configured) / file_name
        if not path.is_file():
            raise TraceError(f"${TRACES_ENV} is {configured!r} but {path} does not exist")
        return path, False
    if (_REPO_TRACES_DIR / file_name).is_file():
        return _REPO_TRACES_DIR / file_name, False
    return BUNDLED_DIR / file_name, True


def load_trace(name: str, max_total_tokens: int | str | None = "default") -> TraceLengths:
    """The (prompt, output) token counts of trace `name`, dropping rows whose prompt + output
    exceeds `max_total_tokens` ("default": DEFAULT_MAX_TOTAL_TOKENS[name]; None: keep all)."""
    path, is_sample = trace_path(name)
    cap = DEFAULT_MAX_TOTAL_TOKENS[name] if max_total_tokens == "default" else max_total_tokens
    prompts, outputs = read_lengths_csv(path)
    kept = [
        (p, o) for p, o in zip(prompts, outputs, strict=True) if cap is None or p + o <= int(cap)
    ]
    if not kept:
        raise TraceError(f"{path}: no request has at most {cap} tokens")
    return TraceLengths(
        name=name,
        source=path,
        prompt_tokens=tuple(p for p, _ in kept),
        output_tokens=tuple(o for _, o in kept),
        is_sample=is_sample,
    )


def read_lengths_csv(path: Path) -> tuple[list[int], list[int]]:
    """Columns num_prefill_tokens and num_decode_tokens of a Vidur-style trace CSV."""
    with csv_rows(path, TraceError, "trace") as reader:
        columns = set(reader.fieldnames or ())
        missing = {"num_prefill_tokens", "num_decode_tokens"} - columns
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        prompts, outputs = [], []
        for line, row in enumerate(reader, start=2):
            try:
                prompt = int(row["num_prefill_tokens"])
                output = int(row["num_decode_tokens"])
            except (TypeError, ValueError):
                raise TraceError(f"{path}:{line}: token counts must be integers") from None
            if prompt < 1 or output < 1:
                raise TraceError(f"{path}:{line}: token counts must be >= 1")
            prompts.append(prompt)
            outputs.append(output)
    if not prompts:
        raise TraceError(f"{path}: no requests (only a header)")
    return prompts, outputs

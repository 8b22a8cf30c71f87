"""Plots of simulation results (matplotlib, an optional dependency: `pip install medha[bench]`).

* TTFT CDF: one curve per policy, log time axis, so both the short requests' sub-second
  TTFTs and the convoy's minutes are visible.
* Chunk sizes over time: for each policy, the prefill chunks of the traced long requests
  (time since the request arrived vs chunk tokens); adaptive chunking shows chunks that shrink
  as the KV cache grows, FCFS a single whole-prompt step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medha.sim.runs import PolicyRun

MAX_TRACED_REQUESTS = 4
"""Long requests drawn per chunk-size panel (the longest ones), to keep the plot readable."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'medha[bench]'") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def plot_ttft_cdf(
    runs: Sequence[PolicyRun], path: str | Path, title: str = "", label: str | None = None
) -> Path:
    """Empirical CDF of TTFT per policy (requests with `label` only, if given)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ttfts = sorted(r.ttft for r in run.result.records if label is None or r.label == label)
        if not ttfts:
            continue
        fractions = [(index + 1) / len(ttfts) for index in range(len(ttfts))]
        ax.step(ttfts, fractions, where="post", label=run.spec)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "TTFT CDF" + (f" ({label} requests)" if label else ""))
    return _save(fig, plt, path)


def plot_chunk_sizes(runs: Sequence[PolicyRun], path: str | Path, title: str = "") -> Path:
    """Prefill chunk tokens over time for the longest traced requests, one panel per policy."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(runs), 1, figsize=(7, 2.6 * len(runs)), squeeze=False, sharex=False
    )
    for ax, run in zip(axes[:, 0], runs, strict=True):
        arrival = {r.request_id: r.arrival for r in run.result.records}
        prompt = {r.request_id: r.prompt_tokens for r in run.result.records}
        traced = sorted(
            {c.request_id for c in run.result.chunks if c.request_id in arrival},
            key=lambda request_id: -prompt[request_id],
        )[:MAX_TRACED_REQUESTS]
        for request_id in traced:
            chunks = [c for c in run.result.chunks if c.request_id == request_id]
            times = [c.time - arrival[request_id] for c in chunks]
            sizes = [c.tokens for c in chunks]
            ax.plot(times, sizes, ".", markersize=2, label=f"{prompt[request_id] // 1000}K prompt")
        ax.set_yscale("log")
        ax.set_ylabel("chunk tokens")
        ax.set_title(run.spec, fontsize="medium", loc="left")
        ax.grid(True, which="both", alpha=0.3)
        if traced:
            ax.legend(fontsize="x-small", ncol=3)
    axes[-1, 0].set_xlabel("seconds since the request arrived")
    if title:
        fig.suptitle(title)
    return _save(fig, plt, path)


def plot_metric_vs_qps(
    grid: Mapping[float, Sequence[PolicyRun]],
    fields: Sequence[str],
    path: str | Path,
    ylabel: str,
    label: str | None = None,
    scale: float = 1.0,
) -> Path:
    """MetricsSummary `fields` (e.g. ttft_p50, ttft_p99) against QPS, one colour per policy and
    one line style per field, log y axis; `grid` maps QPS to that load's runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    loads = sorted(grid)
    specs = [run.spec for run in grid[loads[0]]]
    styles = ["-", "--", ":", "-."]
    for index, spec in enumerate(specs):
        colour = f"C{index}"
        for field, style in zip(fields, styles, strict=False):
            values = []
            for qps in loads:
                run = next(run for run in grid[qps] if run.spec == spec)
                values.append(getattr(run.result.summary(label), field) * scale)
            ax.plot(
                loads,
                values,
                style,
                color=colour,
                marker="o",
                markersize=3,
                label=f"{spec} {field.rsplit('_', 1)[-1]}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("arrival rate (QPS)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    if label:
        ax.set_title(f"{label} requests only", fontsize="medium", loc="left")
    return _save(fig, plt, path)


def write_plots(runs: Sequence[PolicyRun], directory: str | Path, title: str = "") -> list[Path]:
    """ttft_cdf.png (all requests), ttft_cdf_short.png (if there are labels) and
    chunk_sizes.png in `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [plot_ttft_cdf(runs, directory / "ttft_cdf.png", title)]
    labels = {label for run in runs for label in run.result.labels}
    if "short" in labels and len(labels) > 1:
        paths.append(
            plot_ttft_cdf(
                runs, directory / "ttft_cdf_short.png", "TTFT CDF, short requests", label="short"
            )
        )
    paths.append(plot_chunk_sizes(runs, directory / "chunk_sizes.png", title))
    return paths


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Pictures of an engine run: a per-iteration token timeline and TTFT CDFs (matplotlib, an
optional dependency: imported only when plotting)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medha.actors.scheduler_messages import IterationRecord
from medha.bench.engine_run import RequestResult


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "plots need matplotlib: pip install -c constraints.txt matplotlib"
        ) from exc
    return plt


def plot_timeline(
    histories: Mapping[str, Sequence[IterationRecord]], path: Path, long_ids: set[str]
) -> Path:
    """Tokens processed per iteration, long request vs short requests, one panel per policy.

    Each iteration is a bar as wide as it took; the long request's and the short requests'
    tokens are drawn side by side (not stacked) on a shared log axis, so a 32-token decode
    batch and a 6K-token prefill are both readable."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(histories), 1, figsize=(10, 3.2 * len(histories)), squeeze=False, sharey=True
    )
    for ax, (policy, history) in zip(axes[:, 0], histories.items(), strict=True):
        # A paused iteration completes after the ones run while it waited, but started first.
        t0 = min((r.started for r in history), default=0.0)
        starts = [r.started - t0 for r in history]
        widths = [max(r.seconds, 1e-3) for r in history]
        long_tokens = [sum(q for rid, q, _ in r.tokens if rid in long_ids) for r in history]
        short_tokens = [sum(q for rid, q, _ in r.tokens if rid not in long_ids) for r in history]
        ax.bar(
            starts,
            long_tokens,
            width=widths,
            align="edge",
            color="tab:red",
            alpha=0.6,
            label="long request",
        )
        ax.bar(
            starts,
            short_tokens,
            width=[w / 2 for w in widths],
            align="edge",
            color="tab:blue",
            label="short requests",
        )
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(f"{policy}: tokens per iteration (bar width = iteration time)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("tokens")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_cdf(results: Mapping[str, Sequence[RequestResult]], path: Path) -> Path:
    """CDF of the short requests' time to first token, one line per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, rows in results.items():
        ttfts = sorted(r.ttft for r in rows if r.kind == "short")
        if ttfts:
            ax.step(
                ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], where="post", label=policy
            )
    ax.set_xscale("log")
    ax.set_xlabel("time to first token of short requests (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Fit a device profile's efficiency coefficients and overheads to measured step times.

The cost model splits every prediction into terms that are each linear in one coefficient:
    time = sum_k ideal_k / efficiency_k + latency + fixed + seq_layers * sequence_overhead
           + gathered_kv * kv_gather
where ideal_k is the work charged to term k at peak rate (roofline.Terms). Given the binding
roofline branch of every op, the unknowns 1/efficiency_k and the overheads enter linearly, so
they are fitted by non-negative least squares on relative errors. Which branch binds depends on
the coefficients, so the fit is repeated with the branches re-chosen under the new coefficients
until they stop changing (a few rounds), keeping the round with the lowest error.

One replica's measurements cannot separate per-layer from per-iteration overhead (the layer count
never changes), so their sum is fitted and split in the base profile's proportion (a batch
through pp stages pays the iteration overhead pp times and each layer's once: `_fixed_column`). Collective
latencies are hardware constants and are not fitted. A term that never reaches `min_share` of a
measured time (say all-reduce on one device) has no signal and keeps the base value.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from medha.model.arch import ModelArch
from medha.perf.cost_model import RooflineCostModel
from medha.perf.hardware import EFFICIENCY_TERMS, DeviceProfile, Efficiency
from medha.perf.nnls import nnls
from medha.perf.replica import ReplicaSpec
from medha.perf.roofline import Terms
from medha.scheduler.cost import SeqShape

FIXED = "fixed_overhead"
SEQUENCE = "sequence_overhead"
GATHER = "kv_gather"
FITTABLE = (*EFFICIENCY_TERMS, FIXED, SEQUENCE, GATHER)
"""Column names of the fit: the five efficiencies, iteration + layer overhead, per-seq overhead,
seconds per gathered KV token."""


@dataclass(frozen=True)
class Measurement:
    """One timed batch on the replica being calibrated: the time through every stage."""

    seqs: tuple[SeqShape, ...]
    seconds: float

    def __init__(self, seqs: Sequence[SeqShape], seconds: float) -> None:
        if not seqs:
            raise ValueError("a measurement needs at least one sequence")
        if not seconds > 0:
            raise ValueError(f"measured seconds must be > 0, got {seconds!r}")
        object.__setattr__(self, "seqs", tuple(seqs))
        object.__setattr__(self, "seconds", float(seconds))


@dataclass(frozen=True)
class CalibrationResult:
    profile: DeviceProfile
    median_abs_rel_error: float
    max_abs_rel_error: float
    fitted: tuple[str, ...]
    """Columns of FITTABLE fitted from the data."""
    held: tuple[str, ...] = field(default=())
    """Columns kept at the base profile's value (not requested, or no signal in the data)."""
    rounds: int = 0
    """NNLS rounds behind `profile` (0: the base profile fitted best)."""


def fit_profile(
    measurements: Sequence[Measurement],
    base: DeviceProfile,
    arch: ModelArch,
    replica: ReplicaSpec | None = None,
    *,
    dtype_bytes: int = 2,
    free: Collection[str] = FITTABLE,
    min_share: float = 0.02,
    max_rounds: int = 12,
) -> CalibrationResult:
    """Fit `free` coefficients of `base` so the model reproduces `measurements` of `arch`."""
    unknown = set(free) - set(FITTABLE)
    if unknown:
        raise ValueError(f"cannot fit {sorted(unknown)}; fittable: {', '.join(FITTABLE)}")
    if not measurements:
        raise ValueError("calibration needs at least one measurement")
    replica = replica or ReplicaSpec()

    eff = base.efficiency
    fitted: tuple[str, ...] = ()
    best: tuple[float, list[float], Efficiency, tuple[str, ...], int] | None = None
    for fits in range(max_rounds):
        model = RooflineCostModel(arch, base.with_efficiency(eff), replica, dtype_bytes=dtype_bytes)
        rows = [model.batch_terms(m.seqs) for m in measurements]
        errors = _relative_errors(rows, measurements, eff)
        score = sum(e * e for e in errors)
        if best is None or score < best[0]:
            best = (score, errors, eff, fitted, fits)
        new_eff, fitted = _fit_round(rows, measurements, base.efficiency, eff, set(free), min_share)
        if _close(new_eff, eff):
            break
        eff = new_eff

    assert best is not None
    _, errors, eff, fitted, fits = best
    return CalibrationResult(
        profile=base.with_efficiency(eff, calibrated=bool(fitted)),
        median_abs_rel_error=statistics.median(abs(e) for e in errors),
        max_abs_rel_error=max(abs(e) for e in errors),
        fitted=fitted,
        held=tuple(c for c in FITTABLE if c not in fitted),
        rounds=fits,
    )


def _relative_errors(
    rows: Sequence[Terms], measurements: Sequence[Measurement], eff: Efficiency
) -> list[float]:
    return [
        (row.seconds(eff) - m.seconds) / m.seconds
        for row, m in zip(rows, measurements, strict=True)
    ]


def _columns(row: Terms, base: Efficiency) -> dict[str, float]:
    return {
        "matmul": row.matmul,
        "attention": row.attention,
        "memory": row.memory,
        "kv_read": row.kv_read,
        "collective": row.collective,
        FIXED: _fixed_column(row, base),
        SEQUENCE: row.sequence_layers,
        GATHER: row.gathered_kv,
    }


def _fixed_column(row: Terms, base: Efficiency) -> float:
    """The row's fixed overhead in units of FIXED (one iteration's plus every layer's, split as
    in `base`): a batch through pp stages pays the iteration overhead pp times but each layer's
    once, so the column is not simply its iteration count."""
    base_fixed = base.iteration_overhead_s + row.layers * base.layer_overhead_s
    if base_fixed <= 0:
        return row.iterations
    return (row.iterations * base.iteration_overhead_s + row.layers * base.layer_overhead_s) / (
        base_fixed
    )


def _fit_round(
    rows: Sequence[Terms],
    measurements: Sequence[Measurement],
    base: Efficiency,
    current: Efficiency,
    free: set[str],
    min_share: float,
) -> tuple[Efficiency, tuple[str, ...]]:
    """One NNLS fit with the roofline branches chosen under `current`."""
    layers = rows[0].layers
    held_value = _coefficients(base, layers)
    current_value = _coefficients(current, layers)
    columns = [_columns(row, base) for row in rows]
    # An efficiency term with no signal would be fitted to noise: hold it at the base value.
    # (Overheads are judged by their columns alone: a base value of zero says nothing.)
    free = {
        name
        for name in free
        if name not in EFFICIENCY_TERMS
        or any(
            cols[name] * current_value[name] >= min_share * m.seconds
            for cols, m in zip(columns, measurements, strict=True)
        )
    }
    while True:
        names = [name for name in FITTABLE if name in free]
        matrix, targets = [], []
        for row, cols, m in zip(rows, columns, measurements, strict=True):
            held_seconds = sum(cols[n] * held_value[n] for n in FITTABLE if n not in free)
            weight = 1.0 / m.seconds  # fit relative errors: timings span orders of magnitude
            matrix.append([cols[n] * weight for n in names])
            targets.append((m.seconds - row.latency - held_seconds) * weight)
        solution = dict(zip(names, nnls(matrix, targets) if names else [], strict=True))
        # An efficiency fitted to infinity (zero cost) is no fit: hold it and solve again.
        infinite = {n for n in names if n in EFFICIENCY_TERMS and solution[n] <= 0}
        if not infinite:
            break
        free -= infinite
    values = {**held_value, **solution}
    return _efficiency(values, base, layers), tuple(names)


def _coefficients(eff: Efficiency, layers: float) -> dict[str, float]:
    """The fit's unknowns for `eff`: inverse efficiencies and overhead seconds."""
    values = {name: 1.0 / getattr(eff, name) for name in EFFICIENCY_TERMS}
    values[FIXED] = eff.iteration_overhead_s + layers * eff.layer_overhead_s
    values[SEQUENCE] = eff.sequence_overhead_s
    values[GATHER] = eff.kv_gather_s
    return values


def _efficiency(values: dict[str, float], base: Efficiency, layers: float) -> Efficiency:
    base_fixed = base.iteration_overhead_s + layers * base.layer_overhead_s
    if base_fixed > 0:
        scale = values[FIXED] / base_fixed
        iteration, per_layer = base.iteration_overhead_s * scale, base.layer_overhead_s * scale
    else:
        iteration, per_layer = values[FIXED], 0.0
    return Efficiency(
        **{name: 1.0 / values[name] for name in EFFICIENCY_TERMS},
        iteration_overhead_s=iteration,
        layer_overhead_s=per_layer,
        sequence_overhead_s=values[SEQUENCE],
        kv_gather_s=values[GATHER],
    )


def _close(a: Efficiency, b: Efficiency, rel: float = 1e-9) -> bool:
    fields_a, fields_b = vars(a), vars(b)
    return all(
        abs(fields_a[k] - fields_b[k]) <= rel * max(abs(fields_a[k]), abs(fields_b[k]), 1e-12)
        for k in fields_a
    )

"""Non-negative least squares (Lawson-Hanson), pure Python, for a handful of unknowns.

Calibration fits at most seven coefficients to a few hundred timings, so the problem is solved
on the normal equations with unit-norm columns; no numpy or scipy is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def nnls(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """argmin ||A x - b||_2 subject to x >= 0, with A given row by row."""
    if len(rows) != len(targets):
        raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
    n = len(rows[0]) if rows else 0
    norms = [math.sqrt(sum(row[j] ** 2 for row in rows)) for j in range(n)]
    scale = [1.0 / v if v > 0 else 0.0 for v in norms]
    gram = [
        [sum(row[j] * row[k] for row in rows) * scale[j] * scale[k] for k in range(n)]
        for j in range(n)
    ]
    rhs = [
        sum(row[j] * b for row, b in zip(rows, targets, strict=True)) * scale[j] for j in range(n)
    ]
    tol = 1e-12 * max(1.0, math.sqrt(sum(b * b for b in targets)))

    x = [0.0] * n
    passive: list[int] = []
    for _ in range(3 * n + 1):
        gradient = [rhs[j] - sum(gram[j][k] * x[k] for k in range(n)) for j in range(n)]
        candidates = [j for j in range(n) if j not in passive and scale[j] and gradient[j] > tol]
        if not candidates:
            break
        passive.append(max(candidates, key=lambda j: gradient[j]))
        while passive:
            z = _solve_on(gram, rhs, passive, n)
            if all(z[j] > 0 for j in passive):
                x = z
                break
            # Step towards z only as far as keeps x feasible, then drop what hit zero.
            alpha = min(x[j] / (x[j] - z[j]) for j in passive if z[j] <= 0)
            x = [xj + alpha * (zj - xj) for xj, zj in zip(x, z, strict=True)]
            passive = [j for j in passive if x[j] > tol]
            x = [xj if j in passive else 0.0 for j, xj in enumerate(x)]
    return [xj * s for xj, s in zip(x, scale, strict=True)]


def _solve_on(gram: list[list[float]], rhs: list[float], active: list[int], n: int) -> list[float]:
    """Solve the normal equations restricted to `active` columns (others fixed at zero)."""
    a = [[gram[i][j] for j in active] + [rhs[i]] for i in active]
    solution = solve_linear(a)
    full = [0.0] * n
    for j, value in zip(active, solution, strict=True):
        full[j] = value
    return full


def solve_linear(augmented: list[list[float]]) -> list[float]:
    """Gaussian elimination with partial pivoting on an augmented matrix [A | b] (modified)."""
    m = len(augmented)
    for col in range(m):
        pivot = max(range(col, m), key=lambda r: abs(augmented[r][col]))
        if abs(augmented[pivot][col]) < 1e-300:
            raise ValueError("singular system: columns are linearly dependent")
        augmented[col], augmented[pivot] = augmented[pivot], augmented[col]
        for r in range(col + 1, m):
            f = augmented[r][col] / augmented[col][col]
            if f:
                augmented[r] = [
                    a - f * p for a, p in zip(augmented[r], augmented[col], strict=True)
                ]
    out = [0.0] * m
    for r in range(m - 1, -1, -1):
        tail = sum(augmented[r][c] * out[c] for c in range(r + 1, m))
        out[r] = (augmented[r][m] - tail) / augmented[r][r]
    return out

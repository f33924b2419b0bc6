"""How much a gate's data can say: paired non-inferiority tests of a candidate against the champion.

Both models answer the same units (reviewed rows, query groups, text windows, timing rounds). A gate's loss is
what the candidate gives up (accuracy points lost, relative perplexity increase, P95 ratio); the paired
bootstrap resamples the units, with the same draw for both models, and reads the loss's interval at
`gates.confidence` (two-sided). The verdict:

  pass                   the interval's upper end is within the tolerance: the candidate loses at most that
  fail                   the interval's lower end is past the tolerance: it loses more
  insufficient evidence  the interval straddles the tolerance: these units cannot tell; about how many more
                         would (the interval narrows as one over the square root of the units) is reported

A gate with no per-unit figures (the screen on the selection split) is a point rule: the estimate against the
tolerance, with no interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PASS, FAIL, INSUFFICIENT, POINT_PASS, POINT_FAIL = ("pass", "fail", "insufficient evidence", "pass (point rule)",
                                                    "fail (point rule)")


@dataclass(frozen=True)
class Judgement:
    """How the gates weigh evidence (gates.confidence, gates.bootstrap_resamples, gates.on_insufficient_evidence)."""

    level: float = 0.95
    resamples: int = 2000
    seed: int = 0
    on_insufficient: str = "block"  # block | point_rule


@dataclass(frozen=True)
class Evidence:
    estimate: float  # the loss on the units as they are
    low: float | None  # the interval at `level`; None for a point rule
    high: float | None
    verdict: str
    units: int
    unit: str
    more_units: int | None = None  # about how many more units would settle an insufficient gate; None: cannot say
    level: float | None = None

    @property
    def resolved(self) -> bool:
        return self.verdict != INSUFFICIENT


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) bootstrap counts: how often each unit is drawn in each resample (each row sums to n)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    flat = (idx + (np.arange(resamples) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def ratio(num: np.ndarray, den: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum(w * num) / sum(w * den) per resample (w: (resamples, n), or (n,) for the units as they are)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ num) / (w @ den)


def more_units_needed(n: int, estimate: float, low: float, high: float, tolerance: float) -> int | None:
    """About how many more units would make the interval clear the tolerance, if the estimate held: the side of
    the interval that straddles it shrinks as 1/sqrt(units)."""
    gap = abs(tolerance - estimate)
    half = (high - estimate) if estimate <= tolerance else (estimate - low)
    if gap < 1e-12 or not math.isfinite(half):
        return None
    return max(1, math.ceil(n * (half / gap) ** 2) - n)


def point(estimate: float, tolerance: float, units: int, unit: str) -> Evidence:
    ok = estimate <= tolerance + 1e-9
    return Evidence(float(estimate), None, None, POINT_PASS if ok else POINT_FAIL, units, unit)


def verdict_of(estimate: float, low: float, high: float, tolerance: float) -> str:
    if high <= tolerance + 1e-9:
        return PASS
    if low > tolerance + 1e-9:
        return FAIL
    return INSUFFICIENT


def paired(loss: Callable[[np.ndarray], np.ndarray], n: int, tolerance: float, unit: str, j: Judgement,
           weights: np.ndarray | None = None, units: int | None = None) -> Evidence:
    """Judge `loss(w)` (losses per row of weights w; w = ones: the units as they are) by paired bootstrap over
    `n` units. `units`: how many of them the loss is measured on (the rare-class rows of all rows), which is what
    more evidence must add to."""
    units = n if units is None else units
    estimate = float(loss(np.ones((1, n)))[0])
    w = resample_weights(n, j.resamples, j.seed) if weights is None else weights
    draws = loss(w)
    draws = draws[np.isfinite(draws)]
    if not math.isfinite(estimate) or len(draws) < 0.9 * len(w):
        return Evidence(estimate, None, None, INSUFFICIENT, units, unit, None, j.level)
    alpha = (1 - j.level) / 2
    low, high = (float(x) for x in np.quantile(draws, [alpha, 1 - alpha]))
    verdict = verdict_of(estimate, low, high, tolerance)
    more = more_units_needed(units, estimate, low, high, tolerance) if verdict == INSUFFICIENT else None
    return Evidence(estimate, low, high, verdict, units, unit, more, j.level)


def latency_ratio(champion_rounds: list[np.ndarray], candidate_rounds: list[np.ndarray], max_ratio: float,
                  j: Judgement, q: float = 95.0) -> Evidence:
    """P95(candidate) / P95(champion) over timing rounds that interleaved the two in one process; the bootstrap
    resamples whole rounds, so a slow spell of the host weighs on both models alike."""
    if len(champion_rounds) != len(candidate_rounds) or not champion_rounds:
        raise ValueError("latency rounds must pair champion and candidate, at least one round")
    r = len(champion_rounds)
    champ, cand = np.stack(champion_rounds), np.stack(candidate_rounds)  # (rounds, samples per round)
    estimate = float(np.percentile(cand, q) / np.percentile(champ, q))
    rng = np.random.default_rng(j.seed)
    picks = rng.integers(0, r, size=(j.resamples, r))
    draws = (np.percentile(cand[picks].reshape(j.resamples, -1), q, axis=1)
             / np.percentile(champ[picks].reshape(j.resamples, -1), q, axis=1))
    alpha = (1 - j.level) / 2
    low, high = (float(x) for x in np.quantile(draws, [alpha, 1 - alpha]))
    verdict = verdict_of(estimate, low, high, max_ratio)
    more = more_units_needed(r, estimate, low, high, max_ratio) if verdict == INSUFFICIENT else None
    return Evidence(estimate, low, high, verdict, r, "timing rounds", more, j.level)


def interleaved_latency(predictors: dict[str, Callable[[list], object]], inputs: list, rounds: int,
                        per_round: int, warmup: int) -> dict[str, list[np.ndarray]]:
    """Batch-1 latency (ms) of several models in `rounds` rounds of `per_round` requests each, in one process:
    each round times every model on the same requests, the order of models rotating from round to round."""
    import time

    names = list(predictors)
    for name in names:
        for i in range(warmup):
            predictors[name]([inputs[i % len(inputs)]])
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for k in range(rounds):
        batch = [inputs[(k * per_round + i) % len(inputs)] for i in range(per_round)]
        order = names[k % len(names):] + names[: k % len(names)]
        for name in order:
            times = np.empty(per_round)
            for i, x in enumerate(batch):
                t0 = time.perf_counter()
                predictors[name]([x])
                times[i] = (time.perf_counter() - t0) * 1000
            out[name].append(times)
    return out

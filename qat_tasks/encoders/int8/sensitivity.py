"""Per-layer sensitivity and mixed-precision fallback for INT8 encoder candidates.

Sensitivity: quantize one unit (the embeddings, or one encoder layer's MatMuls) at a time with the
candidate's own recipe, everything else FP32, and measure the drop in the role's metrics (accuracy and
rare-class accuracy; escalation recall; NDCG@10 and MRR@10) against the FP32 graph. Fallback: keep the most sensitive units in FP32, one more at a time, until the
gates pass or `max_fp32_units` is reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qat_tasks.encoders.int8 import ort_quant


@dataclass(frozen=True)
class Recipe:
    """How a candidate was quantized: enough to redo it with some units left in FP32."""

    source: Path  # pre-processed FP32 ONNX graph the candidate was quantized from
    kind: str  # dynamic | minmax | percentile | entropy


def quantize(recipe: Recipe, dst: Path, batches: list[dict], percentile: float, exclude: list[str] | None = None,
             only: list[str] | None = None) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if recipe.kind == "dynamic":
        return ort_quant.quantize_dynamic(recipe.source, dst, exclude_nodes=exclude, only_nodes=only)
    return ort_quant.quantize_static(recipe.source, dst, batches, recipe.kind, percentile=percentile,
                                     exclude_nodes=exclude, only_nodes=only)


def analyse(recipe: Recipe, quality: Callable[[Path], dict], batches: list[dict], percentile: float,
            work: Path, keys: tuple[str, ...] = ("accuracy", "rare_class_accuracy")) -> list[dict]:
    """Sensitivity of each unit, most sensitive first. `quality(onnx_path)` returns the metrics named in `keys`
    (fractions); a unit's score is the sum of their drops in points."""
    work.mkdir(parents=True, exist_ok=True)
    units = ort_quant.quantizable_units(recipe.source)
    base = quality(recipe.source)
    rows = []
    for unit, nodes in units.items():
        q = quality(quantize(recipe, work / f"only_{unit}.onnx", batches, percentile, only=nodes))
        row = {"unit": unit, "nodes": len(nodes)}
        for key in keys:
            row[key] = q[key]
            row[f"{key}_drop_pts"] = 100 * (base[key] - q[key])
        row["score"] = sum(row[f"{key}_drop_pts"] for key in keys)
        rows.append(row)
    rows.sort(key=lambda r: (-r["score"], r["unit"]))
    return rows


def fallback_steps(sensitivity: list[dict], max_units: int) -> list[list[str]]:
    """Units to keep in FP32 at each step: the most sensitive one, then the two most sensitive, ..."""
    ranked = [r["unit"] for r in sensitivity]
    return [ranked[:k] for k in range(1, min(max_units, len(ranked)) + 1)]


def nodes_of(recipe: Recipe, units: list[str]) -> list[str]:
    all_units = ort_quant.quantizable_units(recipe.source)
    return [n for u in units for n in all_units[u]]

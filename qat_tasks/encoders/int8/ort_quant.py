"""Adapter for onnxruntime.quantization: the one place that knows its API, so a churn there is one edit.

INT8 candidates for encoders:
  dynamic   weights INT8 ahead of time, activations quantized per batch at run time (no calibration data)
  static    weights and activations INT8 (QDQ format), activation ranges calibrated on the calibration split
            by min-max, percentile or entropy (KL) calibration

Measured on 2-core x86 CPUs with AVX-512 VNNI: per-tensor U8S8 QDQ on MatMul is the fast static layout;
per-channel with Gemm ran slower than FP32, so MatMul-only per-tensor is the default.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def preprocess(src: Path, dst: Path) -> Path:
    """ORT's recommended pre-processing (graph optimisation, shape inference) before quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Symbolic shape inference fails on BERT-like graphs; ONNX shape inference is enough here.
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def quantize_dynamic(src: Path, dst: Path, exclude_nodes: list[str] | None = None, per_channel: bool = False,
                     only_nodes: list[str] | None = None) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=["MatMul", "Gather"], nodes_to_exclude=exclude_nodes or [],
                     nodes_to_quantize=only_nodes or [])
    return dst


class _Reader:
    """CalibrationDataReader over tokenized batches (implements the protocol ORT calls), with the range protocol
    of ORT's strided calibration: the calibrator collects, and folds into its histograms, one batch at a time."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = batches
        self._it: Iterator = iter(batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._batches[start_index:end_index])

    def get_next(self):
        return next(self._it, None)


def calibration_batches(tokenizer, texts: list, max_length: int, batch_size: int = 16) -> list[dict]:
    """Tokenized batches (texts or cross-encoder pairs) for calibration, each padded to its longest row only:
    padding positions would add activations no request produces to the calibrated ranges. Texts are grouped by
    length, so a batch holds little padding."""
    from qat_tasks.encoders.modeling import tokenize

    texts = sorted(texts, key=lambda t: len(t) if isinstance(t, str) else sum(map(len, t)))
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenize(tokenizer, texts[i:i + batch_size], max_length, "np")
        out.append({k: v.astype(np.int64) for k, v in enc.items()})
    return out


def quantize_static(src: Path, dst: Path, batches: list[dict], method: str = "minmax", percentile: float = 99.999,
                    exclude_nodes: list[str] | None = None, per_channel: bool = False,
                    only_nodes: list[str] | None = None,
                    activation_ranges: dict[str, tuple[float, float]] | None = None) -> Path:
    """Static INT8 (QDQ, U8 activations / S8 weights) with activation ranges from `batches`;
    `activation_ranges` ({MatMul node: (min, max)}, e.g. from QAT) override the calibrated range of each
    node's activation input."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: expected one of {CALIBRATION_METHODS}")
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    # Strided by one batch: the calibrator folds each batch's outputs into its ranges or histograms and lets them
    # go. Unstrided, the histogram calibrators hold every intermediate tensor of every batch at once (16 GB for
    # 1,000 rows of MiniLM-L6) and need every batch to have the same shape.
    extra = {"CalibTensorRangeSymmetric": False, "ActivationSymmetric": False, "WeightSymmetric": True,
             "CalibStridedMinMax": 1}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    if activation_ranges:
        import onnx

        inputs = {n.name: n.input[0] for n in onnx.load(str(src), load_external_data=False).graph.node
                  if n.name in activation_ranges}
        extra["TensorQuantOverrides"] = {inputs[node]: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                         for node, (lo, hi) in activation_ranges.items() if node in inputs}
        log.info("static quantization: %d activation ranges taken from QAT, the rest calibrated",
                 len(extra["TensorQuantOverrides"]))
    src, dst = Path(src).resolve(), Path(dst).resolve()
    # The calibrator writes an augmented copy of the model (and tensor files) into the working directory, and prints
    # a line per calibration batch: kept out of the task log.
    with tempfile.TemporaryDirectory(prefix="ort-calib-") as tmp, contextlib.chdir(tmp), \
            contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(src), str(dst), _Reader(batches), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                        op_types_to_quantize=["MatMul", "Gather"], nodes_to_exclude=exclude_nodes or [],
                        nodes_to_quantize=only_nodes or [], calibrate_method=calib, extra_options=extra,
                        calibration_providers=["CPUExecutionProvider"], use_external_data_format=False)
    return dst


def quantizable_units(model_path: Path) -> dict[str, list[str]]:
    """Quantizable nodes (MatMul, Gather) grouped into units: the embeddings, each encoder layer, the rest.
    These are what per-layer sensitivity measures and what FP32 fallback keeps unquantized."""
    import re

    import onnx

    units: dict[str, list[str]] = {}
    for n in onnx.load(str(model_path), load_external_data=False).graph.node:
        if n.op_type not in ("MatMul", "Gather") or not n.name:
            continue
        m = re.search(r"layer\.(\d+)", n.name)
        unit = f"encoder.layer.{m.group(1)}" if m else ("embeddings" if "embeddings" in n.name else "head")
        if n.op_type == "Gather" and unit != "embeddings":
            continue  # shape plumbing, not weights
        units.setdefault(unit, []).append(n.name)
    return units

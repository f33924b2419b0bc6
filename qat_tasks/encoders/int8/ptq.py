"""Post-training INT8 candidates for an encoder champion, as ONNX graphs ONNX Runtime serves.

  ptq_dynamic             INT8 weights, activations quantized per batch at run time
  ptq_static_minmax       QDQ, activation ranges = min/max over the calibration split
  ptq_static_percentile   QDQ, ranges clipped at a percentile of the activation histogram
  ptq_static_entropy      QDQ, ranges minimising KL divergence (TensorRT-style)
  ptq_static_smoothquant  SmoothQuant-style smoothing in PyTorch, re-export, then static min-max
"""

from __future__ import annotations

from pathlib import Path

from qat_tasks.core.config_sections import QuantizationConfig
from qat_tasks.encoders.int8 import ort_quant


def build(name: str, champion_onnx: Path, preprocessed: Path, hf_model, tokenizer, batches: list[dict],
          max_length: int, qc: QuantizationConfig, out_dir: Path, pair: bool = False) -> Path:
    """Write candidate `name` under `out_dir` and return its ONNX path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name}.onnx"
    if name == "ptq_dynamic":
        return ort_quant.quantize_dynamic(preprocessed, dst)
    if name.startswith("ptq_static_") and name != "ptq_static_smoothquant":
        method = name.removeprefix("ptq_static_")
        return ort_quant.quantize_static(preprocessed, dst, batches, method, percentile=qc.percentile)
    if name == "ptq_static_smoothquant":
        import copy

        from qat_tasks.encoders.int8.smoothquant import smooth
        from qat_tasks.encoders.modeling import export_onnx

        smoothed = copy.deepcopy(hf_model)
        smooth(smoothed, batches, qc.smoothquant_alpha)
        fp32 = export_onnx(smoothed, tokenizer, out_dir / "smoothed_fp32.onnx", max_length, pair)
        pre = ort_quant.preprocess(fp32, out_dir / "smoothed_pre.onnx")
        return ort_quant.quantize_static(pre, dst, batches, "minmax")
    raise ValueError(f"unknown INT8 candidate {name!r}")

"""An encoder as a registered model: an MLflow pyfunc (model from code: `pyfunc_model.py` beside this file) whose
artifacts are the Hugging Face folder (weights for further training and quantization), the ONNX graph that
production serves, and the label list with the serving settings (`meta.json`).

`mlflow models serve -m models:/mangaassist-intent-classifier@champion` answers {"text": [...]}; the reranker
takes {"text": queries, "text_pair": passages} and the escalation detector applies its recall-tuned threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc


def log_encoder(hf_dir: Path, onnx_path: Path, meta: dict) -> str:
    """Log the packaged model into the active run; returns its model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    meta_path = hf_dir.parent / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=2))
    role = meta.get("role", "intent_classifier")
    if role == "reranker":
        inputs = [ColSpec("string", "text"), ColSpec("string", "text_pair")]
        outputs = [ColSpec("double", "score")]
    elif role == "escalation_detector":
        inputs = [ColSpec("string", "text")]
        outputs = [ColSpec("string", "label"), ColSpec("double", "p_frustrated"), ColSpec("boolean", "escalate")]
    else:
        inputs = [ColSpec("string", "text")]
        outputs = [ColSpec("string", "intent"), ColSpec("double", "confidence")]
    signature = ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"hf": str(hf_dir), "onnx": str(onnx_path), "meta": str(meta_path)},
        signature=signature,
        pip_requirements=["onnxruntime", "transformers", "pandas", "qat-tasks"],
    )
    return info.model_uri

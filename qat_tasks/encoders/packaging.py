"""An encoder as a registered model: an MLflow pyfunc (model from code: `pyfunc_model.py` beside this file) whose
artifacts are the Hugging Face folder (weights for further training and quantization), the ONNX graph that
production serves, and the label list with the serving settings (`meta.json`).

Each version serves on its own: `mlflow models serve -m models:/mangaassist-intent-classifier@champion` builds an
environment from the version's requirements, every one pinned to constraints.txt (the ONNX Runtime, tokenizers
and transformers its gates measured), and runs the stored `pyfunc_model.py`, which imports published packages
only. It answers {"text": [...]}; the reranker takes {"text": queries, "text_pair": passages} and the escalation
detector applies its recall-tuned threshold. A one-row input example is logged with the signature (MLflow scores
it once while logging, to check the example serves).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc

from qat_tasks.core.pinned_requirements import pinned

# What pyfunc_model.py imports, directly or as the runtime it scores with. `mlflow-skinny` is the distribution of
# the `mlflow` package that loads and serves a pyfunc (its scoring server included) without the tracking server's
# UI, database and plotting stack: a smaller environment to build.
SERVING_REQUIREMENTS = ("mlflow-skinny", "onnxruntime", "transformers", "tokenizers", "numpy", "pandas")

EXAMPLES = {
    "intent_classifier": {"text": ["where is my order?"]},
    "escalation_detector": {"text": ["third time asking, where is my refund?"]},
    "reranker": {"text": ["where is my order?"],
                 "text_pair": ["Order status: every order page shows the tracking number once the parcel ships."]},
}


def log_encoder(hf_dir: Path, onnx_path: Path, meta: dict) -> str:
    """Log the packaged model into the active run; returns its model URI."""
    import pandas as pd
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
    example = EXAMPLES.get(role, EXAMPLES["intent_classifier"])
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"hf": str(hf_dir), "onnx": str(onnx_path), "meta": str(meta_path)},
        signature=signature, input_example=pd.DataFrame(example),
        pip_requirements=pinned(*SERVING_REQUIREMENTS),
    )
    return info.model_uri

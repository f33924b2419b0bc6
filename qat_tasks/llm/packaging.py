"""The 4-bit LLM as a registered model: the compressed-tensors checkpoint folder (what vLLM serves) as an MLflow
pyfunc (model from code: `pyfunc_model.py` beside this file) that runs it on CPU with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc


def log_llm(checkpoint_dir: Path, meta: dict) -> str:
    """Log a 4-bit LLM checkpoint (compressed-tensors folder, what vLLM serves) as a pyfunc into the active run."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    meta_path = checkpoint_dir.parent / "llm-meta.json"
    meta_path.write_text(json.dumps(meta, indent=2))
    signature = ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                               outputs=Schema([ColSpec("string", "completion")]),
                               params=ParamSchema([ParamSpec("max_new_tokens", "long", 48)]))
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"checkpoint": str(checkpoint_dir), "meta": str(meta_path)}, signature=signature,
        pip_requirements=["transformers", "compressed-tensors", "torch", "pandas", "qat-tasks"],
    )
    return info.model_uri

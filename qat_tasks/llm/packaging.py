"""The 4-bit LLM as a registered model: the compressed-tensors checkpoint folder (what vLLM serves) as an MLflow
pyfunc (model from code: `pyfunc_model.py` beside this file) that runs it on CPU with transformers.

Each version serves on its own (`mlflow models serve -m models:/mangaassist-fallback-llm@challenger`): its
requirements are pinned to constraints.txt (torch, transformers, compressed-tensors, ...), the stored
`pyfunc_model.py` imports published packages only, and the system prompt it wraps messages in travels in the
packaged meta. No input example is logged, only the signature: MLflow checks an example while logging by loading
the model and answering it, and loading (dequantizing) the checkpoint to do so took 1.5 to 11 s per version on
the main job's 2-core machine, against 0.1 to 0.15 s for an encoder's example. docs/operations.md gives the
request."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc

from qat_tasks.core.pinned_requirements import pinned

# What pyfunc_model.py imports (the `mlflow` package from mlflow-skinny, which serves a pyfunc), and what
# transformers loads a compressed-tensors checkpoint with.
SERVING_REQUIREMENTS = ("mlflow-skinny", "torch", "transformers", "tokenizers", "compressed-tensors", "safetensors",
                        "numpy", "pandas")


def log_llm(checkpoint_dir: Path, meta: dict) -> str:
    """Log a 4-bit LLM checkpoint (compressed-tensors folder, what vLLM serves) as a pyfunc into the active run."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from qat_tasks.llm.corpora import SYSTEM_PROMPT

    meta_path = checkpoint_dir.parent / "llm-meta.json"
    meta_path.write_text(json.dumps({"system_prompt": SYSTEM_PROMPT, **meta}, indent=2))
    signature = ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                               outputs=Schema([ColSpec("string", "completion")]),
                               params=ParamSchema([ParamSpec("max_new_tokens", "long", 48)]))
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"checkpoint": str(checkpoint_dir), "meta": str(meta_path)}, signature=signature,
        pip_requirements=pinned(*SERVING_REQUIREMENTS),
    )
    return info.model_uri

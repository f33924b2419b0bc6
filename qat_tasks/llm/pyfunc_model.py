"""MLflow "model from code" for the 4-bit fallback LLM. The artifact `checkpoint` is a compressed-tensors
folder: production serves it with vLLM (`vllm serve <folder>`, docs/llm-4bit.md); this wrapper runs it on CPU with
transformers for review and smoke tests. Input: a DataFrame with a `prompt` column (one customer message per
row); output: the greedy `completion` of the chat-formatted prompt."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class QuantizedLlmModel(PythonModel):
    def load_context(self, context):
        from qat_tasks.llm.checkpoint import load_quantized

        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.model, self.tokenizer = load_quantized(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from qat_tasks.llm.routing import greedy_generations

        max_new = int((params or {}).get("max_new_tokens", self.meta.get("max_new_tokens", 48)))
        return pd.DataFrame({"completion": greedy_generations(self.model, self.tokenizer, list(model_input["prompt"]),
                                                              max_new)})


mlflow.models.set_model(QuantizedLlmModel())

"""MLflow "model from code" for packaged encoders: MLflow stores this file with the model and runs it at
load time instead of unpickling an object. Input: a DataFrame with a `text` column; output: intent and
confidence per row."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class EncoderClassifierModel(PythonModel):
    def load_context(self, context):
        from transformers import AutoTokenizer

        from qat_tasks.modeling import OnnxClassifier

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        tokenizer = AutoTokenizer.from_pretrained(context.artifacts["hf"])
        self.classifier = OnnxClassifier(Path(context.artifacts["onnx"]), tokenizer, meta["labels"], meta["max_length"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        texts = list(model_input["text"])
        probs = self.classifier.predict_proba(texts)
        labels = self.classifier.labels
        return pd.DataFrame({"intent": [labels[i] for i in probs.argmax(1)], "confidence": probs.max(1)})


mlflow.models.set_model(EncoderClassifierModel())

"""MLflow "model from code" for packaged encoders: MLflow stores this file with the model and runs it at
load time instead of unpickling an object. Input: a DataFrame with a `text` column (and `text_pair`, the
passage, for the reranker). Output per row: intent and confidence, scaled by the packaged temperature as the
serving component scales it (intent classifier); label, p_frustrated
and escalate, the recall-tuned threshold applied (escalation detector); relevance score (reranker)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class EncoderClassifierModel(PythonModel):
    def load_context(self, context):
        from transformers import AutoTokenizer

        from qat_tasks.encoders.modeling import OnnxClassifier

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.role, self.threshold = meta.get("role", "intent_classifier"), meta.get("threshold")
        self.temperature = float(meta.get("temperature", 1.0))
        tokenizer = AutoTokenizer.from_pretrained(context.artifacts["hf"])
        self.classifier = OnnxClassifier(Path(context.artifacts["onnx"]), tokenizer, meta["labels"], meta["max_length"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import numpy as np

        texts = list(model_input["text"])
        labels = self.classifier.labels
        if self.role == "reranker":
            probs = np.clip(self.classifier.predict_proba(list(zip(texts, model_input["text_pair"], strict=True))),
                            1e-12, 1.0)
            rel = labels.index("relevant")
            return pd.DataFrame({"score": np.log(probs[:, rel]) - np.log(probs[:, 1 - rel])})
        probs = self.classifier.predict_proba(texts)
        if self.role == "escalation_detector":
            p = probs[:, labels.index("frustrated")]
            escalate = p >= (self.threshold if self.threshold is not None else 0.5)
            return pd.DataFrame({"label": np.where(escalate, "frustrated", "calm"), "p_frustrated": p,
                                 "escalate": escalate})
        from qat_tasks.core.metrics import softmax_t

        probs = softmax_t(np.log(np.clip(probs, 1e-12, None)), self.temperature)
        return pd.DataFrame({"intent": [labels[i] for i in probs.argmax(1)], "confidence": probs.max(1)})


mlflow.models.set_model(EncoderClassifierModel())

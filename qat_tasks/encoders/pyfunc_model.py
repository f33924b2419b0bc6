"""MLflow "model from code" for packaged encoders: MLflow stores this file with the model and runs it at
load time instead of unpickling an object. Input: a DataFrame with a `text` column (and `text_pair`, the
passage, for the reranker). Output per row: intent and confidence, scaled by the packaged temperature as the
serving component scales it (intent classifier); label, p_frustrated
and escalate, the recall-tuned threshold applied (escalation detector); relevance score (reranker).

The file imports published packages only (pinned in the model's requirements), so `mlflow models serve` runs it
in an environment built from those requirements alone. It scores the way `encoders.modeling.OnnxClassifier`
scores for evaluation and the gates (same tokenizer arguments, ONNX Runtime session options, batches of texts of
similar length); tests/test_model_serving.py holds the two to the same probabilities."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

BATCH = 64


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class EncoderClassifierModel(PythonModel):
    def load_context(self, context):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.role, self.threshold = meta.get("role", "intent_classifier"), meta.get("threshold")
        self.temperature = float(meta.get("temperature", 1.0))
        self.labels, self.max_length = list(meta["labels"]), int(meta["max_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["hf"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(context.artifacts["onnx"]), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _tokenize(self, inputs: list):
        if inputs and isinstance(inputs[0], tuple):  # (query, passage): token_type_ids tell them apart
            return self.tokenizer([a for a, _ in inputs], [b for _, b in inputs], padding=True,
                                  truncation="longest_first", max_length=self.max_length, return_tensors="np",
                                  return_token_type_ids="token_type_ids" in self.tokenizer.model_input_names)
        return self.tokenizer(inputs, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="np", return_token_type_ids=False)

    def predict_proba(self, inputs: list) -> np.ndarray:
        """Class probabilities, rows in the order given, scored in batches of similar length (little padding)."""
        out = np.empty((len(inputs), len(self.labels)))
        order = np.argsort([len(t) if isinstance(t, str) else sum(map(len, t)) for t in inputs], kind="stable")
        for i in range(0, len(inputs), BATCH):
            idx = order[i:i + BATCH]
            enc = self._tokenize([inputs[j] for j in idx])
            logits = self.session.run(["logits"], {n: enc[n].astype(np.int64) for n in self.input_names})[0]
            out[idx] = softmax(logits)
        return out

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        texts = list(model_input["text"])
        if self.role == "reranker":
            pairs = list(zip(texts, model_input["text_pair"], strict=True))
            probs = np.clip(self.predict_proba(pairs), 1e-12, 1.0)
            rel = self.labels.index("relevant")
            return pd.DataFrame({"score": np.log(probs[:, rel]) - np.log(probs[:, 1 - rel])})
        probs = self.predict_proba(texts)
        if self.role == "escalation_detector":
            p = probs[:, self.labels.index("frustrated")]
            escalate = p >= (self.threshold if self.threshold is not None else 0.5)
            return pd.DataFrame({"label": np.where(escalate, "frustrated", "calm"), "p_frustrated": p,
                                 "escalate": escalate})
        # Temperature scaling of the log-probabilities, as core.metrics.softmax_t applies the fitted temperature.
        probs = softmax(np.log(np.clip(probs, 1e-12, None)) / self.temperature)
        return pd.DataFrame({"intent": [self.labels[i] for i in probs.argmax(1)], "confidence": probs.max(1)})


mlflow.models.set_model(EncoderClassifierModel())

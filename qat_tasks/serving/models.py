"""One registered version of a served model, loaded by alias (or version number) and answered in ONNX Runtime
exactly as the pipeline evaluated it."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np

from qat_tasks.core import registry, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.schema import INTENTS, SERVED_ROLES

log = logging.getLogger(__name__)


class ServingError(RuntimeError):
    """The service cannot serve what was asked (missing alias, wrong role); the message says which."""


def not_served(name: str, role: str) -> ServingError:
    return ServingError(f"{name} is a {role}: the traffic schema records intents, so the escalation detector "
                        f"and reranker are not served by this component yet (only {', '.join(SERVED_ROLES)} models are)")


class ServedModel:
    """One registered version, loaded by alias (or version number), served by ONNX Runtime as the pipeline
    evaluated it."""

    def __init__(self, cfg: PipelineConfig, model_name: str, alias: str, dest: Path):
        from transformers import AutoTokenizer

        from qat_tasks.encoders.modeling import OnnxClassifier

        role = cfg.model(model_name).role
        self.registered = tracking.registered_name(cfg, model_name)
        if role not in SERVED_ROLES:
            raise not_served(self.registered, role)
        client = tracking.configure(cfg)
        mv = (client.get_model_version(self.registered, alias) if alias.isdigit()
              else registry.alias_version(client, self.registered, alias))
        if mv is None:
            raise ServingError(f"{self.registered} has no @{alias} in the registry at {cfg.tracking_uri}")
        self.alias, self.version = alias, str(mv.version)
        paths = registry.download(self.registered, self.version, dest / f"{alias}-v{self.version}")
        meta = json.loads(paths["meta"].read_text())
        if meta.get("role", SERVED_ROLES[0]) not in SERVED_ROLES:
            raise not_served(f"{self.registered} v{self.version}", meta["role"])
        unknown = sorted(set(meta["labels"]) - set(INTENTS))
        if unknown:
            raise ServingError(f"{self.registered} v{self.version} predicts {unknown}, which are not intents of the "
                               f"traffic schema: its answers could not be logged")
        self.precision = meta.get("precision", "fp32")
        self.role = meta.get("role", SERVED_ROLES[0])
        # Confidences are served (and logged, and reviewed) after the temperature scaling the offline evaluation
        # fitted on held-out rows: what its ece_after_ts gate judged. Packages from before it was stored: 1.0.
        self.temperature = float(meta.get("temperature", 1.0))
        if "temperature" not in meta:
            log.warning("%s v%s has no fitted temperature in its package: serving uncalibrated confidences",
                        self.registered, self.version)
        self.classifier = OnnxClassifier(paths["onnx"], AutoTokenizer.from_pretrained(paths["hf"]), meta["labels"],
                                         meta["max_length"], threads=cfg.serving.threads)
        # A fast tokenizer refuses concurrent calls ("Already borrowed"): requests take turns for the few
        # microseconds of tokenization; the ONNX Runtime run (most of the time) is concurrent.
        self._tokenizer_lock = threading.Lock()
        self.model_field = registry.served_model(self.registered, self.version)
        self.event = "quantized_inference" if self.precision.startswith("int") else "inference"

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        from qat_tasks.encoders.modeling import softmax, tokenize

        clf = self.classifier
        with self._tokenizer_lock:
            enc = tokenize(clf.tokenizer, texts, clf.max_length)
        feeds = {n: enc[n].astype(np.int64) for n in clf.input_names}
        probs = softmax(clf.session.run(["logits"], feeds)[0] / self.temperature)
        return [(clf.labels[int(i)], min(1.0, float(p[i]))) for i, p in zip(probs.argmax(1), probs, strict=True)]

    def describe(self) -> str:
        return f"v{self.version} (@{self.alias}, {self.precision}, temperature {self.temperature:.2f})"

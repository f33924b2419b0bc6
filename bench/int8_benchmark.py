"""INT8 against FP32 for the three encoders, side by side in one run on the real MiniLM-based models.

    .venv/bin/python bench/int8_benchmark.py                                   # all three encoders
    .venv/bin/python bench/int8_benchmark.py --models reranker --candidates ptq_dynamic qat_dynamic

Self-contained: refreshes calibration data from the bundled sample, fine-tunes each FP32 champion (into a
temporary MLflow store) on its role's rows, builds each INT8 candidate exactly as the DAG does, then
measures every variant on the model's evaluation rows: its quality metrics (thresholds and temperatures
tuned on the calibration rows), P50/P95 at batch 1 and throughput at batch 32 with a fixed thread count,
size on disk. Latency is measured in interleaved rounds, so machine noise hits all variants alike: read
the ratios. A reranker request at batch 1 is one (query, passage) pair.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TARGETS = ("INT8 P95 >= 2.5x faster than FP32 PyTorch and >= 1.8x faster than FP32 ONNX Runtime, >= 3.5x smaller; "
           "QAT within the role's tolerance of FP32 (intent accuracy 0.3 pts, escalation recall 0 pts, "
           "reranker NDCG@10 0.01)")
# Quality columns per role (fractions, printed in %): the first is what the QAT target is judged on.
COLUMNS = {"intent_classifier": ("accuracy", "rare_class_accuracy", "macro_f1"),
           "escalation_detector": ("escalation_recall", "escalation_precision", "accuracy"),
           "reranker": ("ndcg_at_10", "mrr_at_10", "hit_at_1")}
SHORT = {"accuracy": "acc", "rare_class_accuracy": "rare", "macro_f1": "F1", "escalation_recall": "recall",
         "escalation_precision": "prec", "ndcg_at_10": "NDCG@10", "mrr_at_10": "MRR@10", "hit_at_1": "hit@1"}
ENCODERS = ("intent-classifier", "escalation-detector", "reranker")
ALL_CANDIDATES = ("ptq_dynamic", "ptq_static_minmax", "ptq_static_percentile", "ptq_static_entropy", "qat_static",
                  "qat_dynamic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--models", nargs="*", default=list(ENCODERS))
    ap.add_argument("--candidates", nargs="*", default=list(ALL_CANDIDATES),
                    help="INT8 candidates to build (default: the four PTQ baselines and both QAT exports)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=80)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    os.environ["QAT_STATE_DIR"] = str(tmp / "state")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    import torch

    from qat_tasks.core.config import load_config
    from qat_tasks.core.tracking import RunContext, configure
    from qat_tasks.data.refresh import refresh

    cfg = load_config(args.config)
    configure(cfg)
    torch.set_num_threads(cfg.evaluation.threads)
    window = (cfg.traffic.window.start, cfg.traffic.window.end) if cfg.traffic.window else (date(2026, 7, 1),
                                                                                              date(2026, 10, 1))
    cal = refresh(cfg, *window, progress=False)
    ctx = RunContext("bench", "bench__int8", "INT8 benchmark", "cli")
    print(f"calibration {cal.version}; {cfg.evaluation.threads} thread(s); targets: {TARGETS}", flush=True)
    for model_name in args.models:
        bench_model(cfg, model_name, cal.uri, ctx, args, tmp / model_name)


def bench_model(cfg, model_name: str, calibration_uri: str, ctx, args, tmp: Path) -> None:
    import numpy as np
    import torch

    from qat_tasks.encoders.champion import ensure_champion
    from qat_tasks.encoders.evaluation import evaluate_classifier
    from qat_tasks.encoders.int8 import ptq, qat
    from qat_tasks.encoders.int8.track import Workbench
    from qat_tasks.encoders.modeling import OnnxClassifier, inputs_of, softmax, throughput, tokenize

    t0 = time.time()
    mcfg = cfg.model(model_name)
    qc, threads = mcfg.quantization, cfg.evaluation.threads
    champion = ensure_champion(cfg, model_name, calibration_uri, ctx)
    wb = Workbench(cfg, model_name, calibration_uri, champion, tmp / "work")
    role = wb.role
    print(f"\n{model_name}: FP32 champion ready in {time.time() - t0:.0f} s", flush=True)
    inputs = inputs_of(wb.splits["evaluation"])

    def torch_logits(batch: list) -> np.ndarray:
        with torch.no_grad():
            return wb.hf_model(**tokenize(wb.tokenizer, batch, wb.max_length, "pt")).logits.numpy()

    variants: dict[str, tuple] = {}  # name -> (logits fn, size in MB)
    hf_size = sum(f.stat().st_size for f in Path(wb.paths["hf"]).glob("*.safetensors")) / 2**20
    variants["FP32 PyTorch"] = (torch_logits, hf_size)
    onnx_fp32 = OnnxClassifier(wb.paths["onnx"], wb.tokenizer, wb.labels, wb.max_length, threads)
    variants["FP32 ONNX Runtime"] = (onnx_fp32.logits, onnx_fp32.size_bytes / 2**20)
    build_s = {}
    for name in args.candidates:
        t = time.time()
        if name.startswith("qat"):
            path, _ = qat.build(name, wb.hf_model, wb.tokenizer, wb.labels, wb.train_rows, wb.batches, wb.max_length,
                                mcfg.training, qc, tmp / "qat", wb.trained)
        else:
            path = ptq.build(name, wb.paths["onnx"], wb.preprocessed, wb.hf_model, wb.tokenizer, wb.batches,
                             wb.max_length, qc, tmp / name, wb.pair)
        build_s[name] = time.time() - t
        clf = OnnxClassifier(path, wb.tokenizer, wb.labels, wb.max_length, threads)
        variants[f"INT8 {name}"] = (clf.logits, clf.size_bytes / 2**20)
        print(f"  built {name} in {build_s[name]:.0f} s", flush=True)

    class Probs:  # what evaluate_classifier asks of a classifier, for PyTorch and ORT alike
        def __init__(self, fn):
            self.fn = fn

        def predict_proba(self, xs: list) -> np.ndarray:
            return np.concatenate([softmax(self.fn(xs[i:i + 64])) for i in range(0, len(xs), 64)])

    # The pipeline's own evaluation (thresholds and temperatures tuned on the calibration rows), timing apart.
    quality = {name: evaluate_classifier(Probs(fn), wb.splits, role, cfg, timing=False)
               for name, (fn, _) in variants.items()}
    lat: dict[str, list[float]] = {n: [] for n in variants}
    for fn, _ in variants.values():  # warm-up
        for i in range(10):
            fn([inputs[i]])
    for r in range(args.rounds):
        for name, (fn, _) in variants.items():
            for i in range(args.per_round):
                s = time.perf_counter()
                fn([inputs[(r * args.per_round + i * 7) % len(inputs)]])
                lat[name].append((time.perf_counter() - s) * 1000)
    thr = {name: throughput(fn, inputs, cfg.evaluation.throughput_batch) for name, (fn, _) in variants.items()}

    base_pt, base_ort = "FP32 PyTorch", "FP32 ONNX Runtime"
    p95 = {n: float(np.percentile(v, 95)) for n, v in lat.items()}
    p50 = {n: float(np.percentile(v, 50)) for n, v in lat.items()}
    cols = COLUMNS[role.name]
    unit = "pairs" if role.pair else "rows"
    print(f"\n{model_name}: {len(inputs)} evaluation {unit}, batch-1 latency over {args.rounds} interleaved rounds "
          f"x {args.per_round} requests, {threads} thread(s), throughput at batch {cfg.evaluation.throughput_batch}\n")
    head = (f"| {'variant':<28} | " + " | ".join(f"{SHORT[c]:>7}" for c in cols) + f" | {'P50 ms':>7} | "
            f"{'P95 ms':>7} | {'vs PT':>6} | {'vs ORT':>6} | {'req/s@32':>8} | {'MB':>6} | {'smaller':>7} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, (_, size) in variants.items():
        q = quality[name]
        print(f"| {name:<28} | " + " | ".join(f"{100 * q[c]:7.2f}" for c in cols)
              + f" | {p50[name]:7.2f} | {p95[name]:7.2f} | {p95[base_pt] / p95[name]:5.2f}x | "
              f"{p95[base_ort] / p95[name]:5.2f}x | {thr[name]:8.0f} | {size:6.1f} | {variants[base_pt][1] / size:6.2f}x |")
    key, tol = cols[0], role.tolerance_pts()
    print()
    for name in variants:
        if name.startswith("INT8"):
            d = 100 * (quality[base_pt][key] - quality[name][key])
            ok = (p95[base_pt] / p95[name] >= 2.5, p95[base_ort] / p95[name] >= 1.8,
                  variants[base_pt][1] / variants[name][1] >= 3.5, d <= tol + 1e-9)
            print(f"  {name:<28} P95 vs PyTorch {'ok ' if ok[0] else 'MISS'}  vs ORT {'ok ' if ok[1] else 'MISS'}  "
                  f"size {'ok ' if ok[2] else 'MISS'}  {SHORT[key]} drop {d:+.2f} pts "
                  f"{'ok' if ok[3] else ('MISS' if name.startswith('INT8 qat') else '(PTQ, no target)')}"
                  f"  (built in {build_s[name.removeprefix('INT8 ')]:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

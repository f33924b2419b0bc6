"""INT8 against FP32 for an encoder, side by side in one run on the real MiniLM-based model.

    .venv/bin/python bench/int8_benchmark.py                      # intent classifier, demo profile
    .venv/bin/python bench/int8_benchmark.py --candidates ptq_dynamic qat_dynamic

Self-contained: refreshes calibration data from the bundled sample, fine-tunes the FP32 champion (into a
temporary MLflow store), builds each INT8 candidate exactly as the DAG does, then measures every variant:
quality on the reviewed evaluation split, P50/P95 at batch 1 and throughput at batch 32 with a fixed
thread count, size on disk. Latency is measured in interleaved rounds, so machine noise hits all
variants alike: read the ratios.
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

TARGETS = "INT8 P95 >= 2.5x faster than FP32 PyTorch and >= 1.8x faster than FP32 ONNX Runtime, >= 3.5x smaller, " \
          "QAT accuracy within 0.3 points of FP32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--model", default="intent-classifier")
    ap.add_argument("--candidates", nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=80)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    os.environ["QAT_STATE_DIR"] = str(tmp / "state")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    import numpy as np
    import torch

    from qat_tasks import ptq, qat
    from qat_tasks.calibration import refresh
    from qat_tasks.challenger import Workbench
    from qat_tasks.champion import ensure_champion
    from qat_tasks.config import load_config
    from qat_tasks.metrics import classification_report
    from qat_tasks.modeling import OnnxClassifier, softmax, throughput, tokenize
    from qat_tasks.tracking import RunContext, configure

    cfg = load_config(args.config)
    configure(cfg)
    mcfg = cfg.model(args.model)
    qc = mcfg.quantization
    from qat_tasks.challenger import choose_candidates

    candidates = args.candidates or list(choose_candidates(qc, cfg.gates.intent_classifier.max_accuracy_drop_pts, 1.0)[0])
    threads = cfg.evaluation.threads
    torch.set_num_threads(threads)
    ctx = RunContext("bench", "bench__int8", "INT8 benchmark", "cli")
    t0 = time.time()
    window = (cfg.traffic.window.start, cfg.traffic.window.end) if cfg.traffic.window else (date(2026, 7, 1), date(2026, 10, 1))
    cal = refresh(cfg, *window, progress=False)
    champion = ensure_champion(cfg, args.model, cal.uri, ctx)
    print(f"calibration {cal.version}; FP32 champion v{champion['version']} ready in {time.time() - t0:.0f} s", flush=True)
    wb = Workbench(cfg, args.model, cal.uri, champion, tmp / "work")
    texts = [r["text"] for r in wb.eval_rows]
    y = np.array([wb.labels.index(r["label"]) for r in wb.eval_rows])
    rare = list(cfg.calibration.rare_intents)

    def torch_logits(batch: list[str]) -> np.ndarray:
        enc = tokenize(wb.tokenizer, batch, wb.max_length, "pt")
        with torch.no_grad():
            return wb.hf_model(**enc).logits.numpy()

    variants: dict[str, tuple] = {}  # name -> (logits fn, size in MB)
    hf_size = sum(f.stat().st_size for f in Path(wb.paths["hf"]).glob("*.safetensors")) / 2**20
    variants["FP32 PyTorch"] = (torch_logits, hf_size)
    onnx_fp32 = OnnxClassifier(wb.paths["onnx"], wb.tokenizer, wb.labels, wb.max_length, threads)
    variants["FP32 ONNX Runtime"] = (onnx_fp32.logits, onnx_fp32.size_bytes / 2**20)
    build_s = {}
    for name in candidates:
        t = time.time()
        if name.startswith("qat"):
            path, _ = qat.build(name, wb.hf_model, wb.tokenizer, wb.labels, wb.train_rows, wb.batches, wb.max_length,
                                mcfg.training, qc, tmp / "qat", wb.trained)
        else:
            path = ptq.build(name, wb.paths["onnx"], wb.preprocessed, wb.hf_model, wb.tokenizer, wb.batches,
                             wb.max_length, qc, tmp / name)
        build_s[name] = time.time() - t
        clf = OnnxClassifier(path, wb.tokenizer, wb.labels, wb.max_length, threads)
        variants[f"INT8 {name}"] = (clf.logits, clf.size_bytes / 2**20)
        print(f"  built {name} in {build_s[name]:.0f} s", flush=True)

    quality = {}
    for name, (fn, _) in variants.items():
        probs = np.concatenate([softmax(fn(texts[i:i + 64])) for i in range(0, len(texts), 64)])
        quality[name] = classification_report(y, probs, wb.labels, rare)
    lat: dict[str, list[float]] = {n: [] for n in variants}
    for fn, _ in variants.values():  # warm-up
        for i in range(10):
            fn([texts[i]])
    for r in range(args.rounds):
        for name, (fn, _) in variants.items():
            for i in range(args.per_round):
                s = time.perf_counter()
                fn([texts[(r * args.per_round + i) % len(texts)]])
                lat[name].append((time.perf_counter() - s) * 1000)
    thr = {name: throughput(fn, texts, cfg.evaluation.throughput_batch) for name, (fn, _) in variants.items()}

    base_pt, base_ort = "FP32 PyTorch", "FP32 ONNX Runtime"
    p95 = {n: float(np.percentile(v, 95)) for n, v in lat.items()}
    p50 = {n: float(np.percentile(v, 50)) for n, v in lat.items()}
    print(f"\n{args.model}: {len(texts)} reviewed evaluation rows, batch-1 latency over {args.rounds} interleaved rounds "
          f"x {args.per_round} requests, {threads} thread(s), throughput at batch {cfg.evaluation.throughput_batch}\n")
    head = (f"| {'variant':<28} | {'acc':>6} | {'rare':>6} | {'F1':>6} | {'P50 ms':>7} | {'P95 ms':>7} | "
            f"{'vs PT':>6} | {'vs ORT':>6} | {'req/s@32':>8} | {'MB':>6} | {'smaller':>7} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, (_, size) in variants.items():
        q = quality[name]
        print(f"| {name:<28} | {100 * q['accuracy']:6.2f} | {100 * q['rare_class_accuracy']:6.2f} | "
              f"{100 * q['macro_f1']:6.2f} | {p50[name]:7.2f} | {p95[name]:7.2f} | {p95[base_pt] / p95[name]:5.2f}x | "
              f"{p95[base_ort] / p95[name]:5.2f}x | {thr[name]:8.0f} | {size:6.1f} | {variants[base_pt][1] / size:6.2f}x |")
    print(f"\ntargets: {TARGETS}")
    for name in variants:
        if name.startswith("INT8"):
            d = 100 * (quality[base_pt]["accuracy"] - quality[name]["accuracy"])
            ok = (p95[base_pt] / p95[name] >= 2.5, p95[base_ort] / p95[name] >= 1.8,
                  variants[base_pt][1] / variants[name][1] >= 3.5, d <= 0.3)
            print(f"  {name:<28} P95 vs PyTorch {'ok ' if ok[0] else 'MISS'}  vs ORT {'ok ' if ok[1] else 'MISS'}  "
                  f"size {'ok ' if ok[2] else 'MISS'}  accuracy drop {d:+.2f} pts {'ok' if ok[3] else 'MISS'}"
                  f"  (built in {build_s[name.removeprefix('INT8 ')]:.0f} s)")


if __name__ == "__main__":
    main()

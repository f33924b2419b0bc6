"""What shadow mirroring costs the champion: a bounded load against the real service, mirroring off and on.

    .venv/bin/python bench/shadow_load.py                       # 1,000 requests per mode, concurrency 1
    .venv/bin/python bench/shadow_load.py --requests 2000 --concurrency 2 --rounds 8

Self-contained: a temporary SQLite MLflow store gets the real MiniLM-L6 backbone with a 10-intent head as the
FP32 @champion (the head is untrained: this measures latency, not quality) and its dynamic INT8 as @shadow. The
service runs in its own process (`python -m qat_tasks.serving`, ONNX Runtime, 1 thread per model); the load
generator is this process, on loopback, keep-alive, closed loop. Mirroring is switched off and on between
interleaved rounds (POST /admin/mirroring), so both modes see the same texts and the same machine noise: read the
ratio. Latency is the client's: what a caller of the service waits.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

TARGET = "mirroring adds at most 10 % to the champion's P95"


def build_registry(root: Path) -> Path:
    """Config file of a demo-shaped profile whose registry holds the FP32 champion and INT8 shadow."""
    import mlflow
    import yaml

    from qat_tasks import ort_quant, registry, tracking
    from qat_tasks.config import DEFAULT_CONFIG, parse_config
    from qat_tasks.modeling import build_classifier, export_onnx
    from qat_tasks.schema import INTENTS

    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data.update({"state_dir": str(root / "state"), "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}})
    data["serving"] = {"log_dir": str(root / "logs"), "reload_interval_s": 0.0, "threads": 1}
    cfg = parse_config(data, "bench")
    client = tracking.configure(cfg)
    exp = tracking.ensure_experiment(cfg, "intent-classifier")
    name = tracking.registered_name(cfg, "intent-classifier")
    model, tokenizer = build_classifier(cfg, cfg.model("intent-classifier").source, list(INTENTS))
    hf = root / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    fp32 = export_onnx(model, tokenizer, root / "fp32" / "model.onnx", 48)
    (root / "int8").mkdir()
    int8 = ort_quant.quantize_dynamic(ort_quant.preprocess(fp32, root / "pre.onnx"), root / "int8" / "model.onnx")
    for precision, onnx in (("fp32", fp32), ("int8", int8)):
        with mlflow.start_run(experiment_id=exp) as run:
            meta = {"labels": list(INTENTS), "max_length": 48, "role": "intent_classifier", "precision": precision}
            uri = registry.log_encoder(hf, onnx, meta)
            version = registry.register(client, name, uri, f"bench:{precision}", run.info.run_id, {}, "bench")
        client.set_registered_model_alias(name, "champion" if precision == "fp32" else "shadow", version)
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def texts(n: int) -> list[str]:
    from qat_tasks.schema import parse_line
    from qat_tasks.storage import open_lines

    out = []
    for f in sorted((Path(__file__).resolve().parent.parent / "data" / "traffic_sample").glob("dt=*/*")):
        for raw in open_lines(str(f)):
            rec, _ = parse_line(raw)
            if rec is not None:
                out.append(rec.text)
            if len(out) >= n:
                return out
    return out


def run_round(url: str, batch: list[str], concurrency: int) -> list[float]:
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    chunks = [batch[i::concurrency] for i in range(concurrency)]

    def worker(items: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            mine = []
            for text in items:
                t0 = time.perf_counter()
                r = client.post("/v1/intent", json={"text": text})
                mine.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def main() -> int:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="per mode")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per mode")
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shadow-bench-") as tmp:
        root = Path(tmp)
        config = build_registry(root)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        server = subprocess.Popen([sys.executable, "-m", "qat_tasks.serving", "--config", str(config), "--model",
                                   "intent-classifier", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the service did not start:\n{server.stdout.read()}")
                time.sleep(0.5)
            sample = texts(args.requests)
            per_round = max(1, len(sample) // args.rounds)
            run_round(url, sample[:50], args.concurrency)  # warm-up: sessions, arenas, connection pool
            results = {"off": [], "on": []}
            for r in range(args.rounds):
                batch = sample[r * per_round:(r + 1) * per_round]
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    httpx.post(f"{url}/admin/mirroring", json={"enabled": mode == "on"}).raise_for_status()
                    results[mode].extend(run_round(url, batch, args.concurrency))
                    time.sleep(0.5)  # let the mirror queue drain before the next round
            metrics = dict(line.rsplit(" ", 1) for line in httpx.get(f"{url}/metrics").text.splitlines())
        finally:
            server.terminate()
            server.wait(timeout=30)

    def row(mode: str) -> str:
        a = np.array(results[mode])
        return (f"| mirroring {mode:<3} | {len(a):8d} | {np.percentile(a, 50):7.2f} | {np.percentile(a, 95):7.2f} | "
                f"{np.percentile(a, 99):7.2f} | {a.mean():7.2f} |")

    print(f"\nMiniLM-L6 intent classifier: FP32 @champion, dynamic INT8 @shadow; {args.requests} requests per mode in "
          f"{args.rounds} interleaved rounds, concurrency {args.concurrency}, client-side latency (ms)\n")
    print("| mode          | requests |     P50 |     P95 |     P99 |    mean |")
    print("|---------------|----------|---------|---------|---------|---------|")
    print(row("off"))
    print(row("on"))
    ratio = np.percentile(results["on"], 95) / np.percentile(results["off"], 95)
    shadow = {k.split("{")[0].removeprefix("qat_shadow_").removesuffix("_total"): v for k, v in metrics.items()
              if k.startswith("qat_shadow_")}
    print(f"\nP95 with mirroring / without: {ratio:.3f} ({100 * (ratio - 1):+.1f} %); target: {TARGET} -> "
          f"{'met' if ratio <= 1.10 else 'NOT met'}")
    print("shadow counters: " + ", ".join(f"{k} {v}" for k, v in shadow.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What shadow mirroring costs the champion: a bounded load against the real service, mirroring off and on.

    .venv/bin/python bench/shadow_load.py                        # 1,000 requests per mode, concurrency 1
    .venv/bin/python bench/shadow_load.py --modes off,off2       # an A/A run: the noise floor of the ratio
    .venv/bin/python bench/shadow_load.py --role reranker        # /v1/rerank: 8 passages per query
    .venv/bin/python bench/shadow_load.py --workdir /tmp/shadow-bench   # keep the registry: later runs reuse it

Self-contained: a SQLite MLflow store gets the real MiniLM-L6 backbone with the role's head (10 intents; calm /
frustrated; irrelevant / relevant for the cross-encoder) as the FP32 @champion (the head is untrained: this
measures latency, not quality) and its dynamic INT8 as @shadow. The service runs in its own process (`python -m
qat_tasks.serving`, ONNX Runtime, OMP_NUM_THREADS=1) and starts its shadow process; the load generator runs in
another (keep-alive HTTP/1.1 on loopback, closed loop, texts of the bundled traffic sample). Mirroring is switched
off and on between interleaved rounds (POST /admin/mirroring, with the admin token) over the same texts, so both
modes see the same machine noise: read the ratio. Latency is the client's (what a caller waits); the champion's
own inference time comes from the service's log records of the same requests.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

LOAD_BEFORE = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "n/a"

TARGET = "mirroring adds at most 5 % to the champion's P95"
TARGET_RATIO = 1.05
# Per role: the configured model, its endpoint, its labels and max_length (the demo config's), whether it reads pairs.
ROLES = {"intent": ("intent-classifier", "/v1/intent", None, 48, False),
         "escalation": ("escalation-detector", "/v1/escalation", ("calm", "frustrated"), 64, False),
         "reranker": ("reranker", "/v1/rerank", ("irrelevant", "relevant"), 64, True)}
PASSAGES = ["Order status: every order page shows the tracking number once the parcel ships.",
            "Returns are free within 30 days for unopened box sets; opened volumes get store credit.",
            "Shipping to Canada takes 5 to 8 business days; express takes 2 to 3.",
            "Gift cards never expire and can pay for pre-orders.", "One Piece volumes 1 to 105 are in stock.",
            "Payments: we take cards, PayPal and convenience-store payment in Japan.",
            "Damaged deliveries are replaced at no cost: send a photo within 7 days.",
            "Recommendations follow the series you bought and the genres you follow."]


def build_registry(root: Path, role: str) -> Path:
    """A demo-shaped config whose registry holds the role's FP32 champion (v1) and its dynamic INT8 shadow (v2)."""
    import mlflow
    import yaml

    from qat_tasks.core import registry, tracking
    from qat_tasks.core.config import DEFAULT_CONFIG, parse_config
    from qat_tasks.core.schema import INTENTS
    from qat_tasks.encoders import packaging
    from qat_tasks.encoders.int8 import ort_quant
    from qat_tasks.encoders.modeling import build_classifier, export_onnx

    model_name, _, labels, max_length, pair = ROLES[role]
    labels = list(labels or INTENTS)
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data.update({"state_dir": str(root / "state"), "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}})
    data["serving"] = {"log_dir": str(root / "logs"), "reload_interval_s": 0.0, "threads": 1}
    cfg = parse_config(data, "bench")
    client = tracking.configure(cfg)
    exp = tracking.ensure_experiment(cfg, model_name)
    name = tracking.registered_name(cfg, model_name)
    model, tokenizer = build_classifier(cfg, cfg.model(model_name).source, labels)
    hf = root / "pkg" / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    fp32 = export_onnx(model, tokenizer, root / "fp32" / "model.onnx", max_length, pair=pair)
    (root / "int8").mkdir()
    int8 = ort_quant.quantize_dynamic(ort_quant.preprocess(fp32, root / "pre.onnx"), root / "int8" / "model.onnx")
    for precision, onnx, alias in (("fp32", fp32, "champion"), ("int8", int8, "shadow")):
        with mlflow.start_run(experiment_id=exp, run_name=f"bench {precision}") as run:
            meta = {"labels": labels, "max_length": max_length, "role": cfg.model(model_name).role,
                    "precision": precision, "pair": pair, **({"threshold": 0.5} if role == "escalation" else {})}
            uri = packaging.log_encoder(hf, onnx, meta)
            version = registry.register(client, name, uri, f"bench:{precision}", run.info.run_id, {}, "bench")
        client.set_registered_model_alias(name, alias, version)
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def request_body(role: str, request_id: str, text: str) -> dict:
    if role == "reranker":
        return {"query": text, "candidates": [{"id": f"p{i}", "text": p} for i, p in enumerate(PASSAGES)],
                "top_k": 3, "request_id": request_id}
    return {"text": text, "request_id": request_id}


def sample_texts(n: int) -> list[str]:
    """The first n valid requests of the bundled traffic sample, in log order."""
    from datetime import date

    from qat_tasks.core.schema import parse_line
    from qat_tasks.core.storage import list_log_files, open_lines

    out: list[str] = []
    for lf in list_log_files(str(ROOT / "data" / "traffic_sample"), date.min, date.max):
        for raw in open_lines(lf.uri):
            rec, _ = parse_line(raw)
            if rec is not None and rec.event != "shadow_inference":
                out.append(rec.text)
                if len(out) == n:
                    return out
    raise SystemExit(f"the traffic sample has only {len(out)} valid requests; asked for {n}")


# -- the load generator: its own process, sharing no GIL with the service or with this process ------------------------
def load_generator(conn, url: str, role: str) -> None:
    """Receives (requests [(request_id, text)], concurrency), answers (client-side latencies in ms, errors)."""
    import http.client
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    pool: queue.SimpleQueue = queue.SimpleQueue()  # keep-alive connections reused across rounds

    def worker(job: list, k: int, step: int, lat: list, errors: list) -> None:
        try:
            c = pool.get_nowait()
        except queue.Empty:
            c = http.client.HTTPConnection(host, port, timeout=30)
        for i in range(k, len(job), step):
            request_id, text = job[i]
            body = json.dumps(request_body(role, request_id, text)).encode()
            for attempt in (1, 2):
                t0 = time.perf_counter()
                try:
                    c.request("POST", ROLES[role][1], body, {"Content-Type": "application/json"})
                    r = c.getresponse()
                    data = r.read()
                    break
                except (ConnectionError, http.client.HTTPException) as exc:
                    # The server closes idle keep-alive connections (5 s): reconnect once, untimed.
                    c.close()
                    c = http.client.HTTPConnection(host, port, timeout=30)
                    if attempt == 2:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        data, r = b"", None
            lat[i] = (time.perf_counter() - t0) * 1000
            if r is not None and r.status != 200:
                errors.append(f"HTTP {r.status}: {data[:200]!r}")
        pool.put(c)

    while (msg := conn.recv()) is not None:
        job, concurrency = msg
        lat, errors = [0.0] * len(job), []
        threads = [threading.Thread(target=worker, args=(job, k, concurrency, lat, errors))
                   for k in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.send((lat, errors))


# -- the service ------------------------------------------------------------------------------------------------------
ADMIN_TOKEN = secrets.token_urlsafe(24)  # this run's service takes admin calls with it only


def start_service(config: Path, role: str) -> tuple[subprocess.Popen, str, list[str]]:
    import socket

    with socket.socket() as s:  # a free port now; the service binds it a few seconds later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "QAT_SERVING_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "qat_tasks.serving", "--config", str(config), "--model",
                             ROLES[role][0], "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:  # keep draining the service's output, so it never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "http://" in line and "listening on" in line:
                found.put(line[line.index("http://"):].split()[0].rstrip(".,;)"))
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = found.get(timeout=180)
    except queue.Empty:
        url = None
    if url is None:
        proc.kill()
        raise SystemExit("the service did not start:\n" + "\n".join(lines[-30:]))
    deadline = time.monotonic() + 60
    while True:  # the URL is printed just before the server binds
        try:
            call(url, "/health")
            return proc, url, lines
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the service did not answer:\n" + "\n".join(lines[-30:])) from None
            time.sleep(0.1)


def call(url: str, path: str, body: dict | None = None):
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {ADMIN_TOKEN}"} if path.startswith("/admin/") else {})}
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return text if path == "/metrics" else json.loads(text)


def shadow_counters(url: str) -> dict[str, float]:
    """The shadow's counters summed over models and reasons (mirrored, answered, errors, timeouts, dropped, ...)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(call(url, "/metrics")):
        if family.type == "counter" and family.name.startswith("qat_shadow_"):
            key = family.name.removeprefix("qat_shadow_")
            out[key] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return out


def drain(url: str, timeout: float = 60) -> None:
    """Wait until the shadow has worked off its queue: the next round starts on a quiet service."""
    deadline = time.monotonic() + timeout
    while call(url, "/health")["mirror_queue"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the call taken off the queue last


def champion_ms(log_dir: Path, since: float, role: str) -> dict[str, list[float]]:
    """The champion's own inference time per request of this run (a reused registry keeps earlier runs' logs),
    from the service's log records, by mode."""
    from datetime import UTC, datetime, timedelta

    from qat_tasks.promotion.traffic import log_root, read_role_records

    start = datetime.fromtimestamp(since, UTC)
    model_name = ROLES[role][0]
    served = {"intent": "intent_classifier", "escalation": "escalation_detector", "reranker": "reranker"}[role]
    records, _ = read_role_records(log_root(str(log_dir), model_name, served), start,
                                   datetime.now(UTC) + timedelta(minutes=1), served)
    out: dict[str, list[float]] = {}
    for r in records:
        if r.event != "shadow_inference" and r.request_id.startswith("bench-"):
            out.setdefault(r.request_id.split("-")[1], []).append(r.latency_ms)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per mode (default 1000)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per mode (default 4)")
    parser.add_argument("--concurrency", type=int, default=1, help="closed-loop clients (default 1)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--modes", default="off,on", help="off,off2: an A/A run, the noise floor of the ratio")
    parser.add_argument("--role", choices=sorted(ROLES), default="intent", help="the encoder to load (default intent)")
    parser.add_argument("--workdir", help="keep the registry here and reuse it on later runs (skips the export)")
    args = parser.parse_args()

    t_start = time.time()
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="shadow-bench-") as tmp:
        import yaml

        root = Path(args.workdir or tmp) / args.role
        config = root / "bench.yaml"
        if not config.exists():
            root.mkdir(parents=True, exist_ok=True)
            build_registry(root, args.role)
        log_dir = Path(yaml.safe_load(config.read_text())["serving"]["log_dir"])
        texts = sample_texts(args.requests + args.warmup)
        proc, url, out_lines = start_service(config, args.role)
        ctx = mp.get_context("spawn")
        here, there = ctx.Pipe()
        client = ctx.Process(target=load_generator, args=(there, url, args.role), daemon=True)
        client.start()
        measured = texts[args.warmup:]
        results: dict[str, list[float]] = {m: [] for m in modes}
        round_p95: dict[str, list[float]] = {m: [] for m in modes}
        try:
            call(url, "/admin/mirroring", {"enabled": True})
            here.send(([(f"warmup-{i}", t) for i, t in enumerate(texts[:args.warmup])], args.concurrency))
            here.recv()  # warm-up: both sessions, arenas, connections
            drain(url)
            before = shadow_counters(url)
            for r in range(args.rounds):
                idx = range(r, len(measured), args.rounds)
                for mode in modes if r % 2 == 0 else modes[::-1]:
                    call(url, "/admin/mirroring", {"enabled": mode.startswith("on")})
                    here.send(([(f"bench-{mode}-{r}-{i}", measured[i]) for i in idx], args.concurrency))
                    lat, errors = here.recv()
                    if errors:
                        raise SystemExit(f"{len(errors)} failed requests, first: {errors[0]}")
                    results[mode].extend(lat)
                    round_p95[mode].append(float(np.percentile(lat, 95)))
                    drain(url)
            after = shadow_counters(url)
            health = call(url, "/health")["models"][ROLES[args.role][0]]
        finally:
            here.send(None)
            client.join(10)
            proc.terminate()
            proc.wait(timeout=60)
        server = champion_ms(log_dir, t_start, args.role)

    print("\n" + "\n".join(line for line in out_lines if "serving " in line or "listening on" in line))
    what = {"intent": "intent classifier", "escalation": "escalation detector",
            "reranker": f"reranker ({len(PASSAGES)} passages per query, top 3)"}[args.role]
    print(f"MiniLM-L6 {what}, FP32 @champion v{health['champion']} and dynamic INT8 @shadow v{health['shadow']} in "
          f"the shadow process: {args.requests} requests per mode in {args.rounds} interleaved rounds, concurrency "
          f"{args.concurrency}; client-side latency in ms over loopback, and the champion's inference time from the "
          f"service's log ({time.time() - t_start:.0f} s in all; load average before: {LOAD_BEFORE})\n")
    head = (f"| {'mode':<13} | {'requests':>8} | {'P50':>6} | {'P95':>6} | {'P99':>6} | {'mean':>6} | "
            f"{'inference P95':>13} | client P95 per round")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:]) + "|")
    for mode in modes:
        a = np.array(results[mode])
        inf = f"{np.percentile(server[mode], 95):13.2f}" if server.get(mode) else f"{'-':>13}"
        print(f"| mirroring {mode:<3} | {a.size:8d} | {np.percentile(a, 50):6.2f} | {np.percentile(a, 95):6.2f} | "
              f"{np.percentile(a, 99):6.2f} | {a.mean():6.2f} | {inf} | "
              + " ".join(f"{p:.2f}" for p in round_p95[mode]))
    p95 = {m: float(np.percentile(results[m], 95)) for m in modes}
    p50 = {m: float(np.percentile(results[m], 50)) for m in modes}
    first, second = modes[0], modes[1]
    ratio = p95[second] / p95[first]
    shadow = {k: int(after.get(k, 0) - before.get(k, 0)) for k in ("mirrored", "answered", "errors", "timeouts",
                                                                       "dropped", "worker_restarts")}
    print(f"\nP95 {second} / {first}: {ratio:.3f} ({100 * (ratio - 1):+.1f} %); P50: {p50[second] / p50[first]:.3f}")
    print("shadow during the measured rounds: " + ", ".join(f"{k} {v}" for k, v in shadow.items()))
    if modes == ["off", "on"]:
        print(f"target: {TARGET}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

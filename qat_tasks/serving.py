"""The serving component: an HTTP service that answers with @champion and mirrors every request to @shadow.

  POST /v1/intent          {"text": ..., "conversation_id"?, "turn"?, "request_id"?, "locale"?} -> the champion's answer
  GET  /health             versions served, mirroring on/off, shadow state
  GET  /metrics            Prometheus text: requests, champion latency, mirrored / answered / errors / timeouts / dropped
  POST /admin/mirroring    {"enabled": bool}
  POST /admin/reload       re-resolve the aliases now (they are also polled every serving.reload_interval_s)

The champion answers in the request path. The mirror goes to a bounded queue the request never waits on; shadow
workers run at a lower CPU priority, each call on a runner thread with a deadline: an exception is an error, a late
answer a timeout, and a runner stuck in a hung call is abandoned and replaced (up to a cap, then mirroring stops
and /health says why). Both answers are logged in the traffic schema, so the logs are calibration data.

`replay()` is the offline mode: logged records sent through champion and shadow in process, one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from qat_tasks import registry, tracking
from qat_tasks.config import PipelineConfig, load_config
from qat_tasks.traffic_log import LogWriter

log = logging.getLogger(__name__)

SHADOW = "shadow"
MAX_ABANDONED_RUNNERS = 8  # hung shadow calls left behind before mirroring gives up


class ServingError(RuntimeError):
    pass


class ServedModel:
    """One registered version, loaded by alias, served by ONNX Runtime the way the pipeline evaluated it."""

    def __init__(self, cfg: PipelineConfig, model_name: str, alias: str, dest: Path):
        from transformers import AutoTokenizer

        from qat_tasks.modeling import OnnxClassifier

        client = tracking.configure(cfg)
        self.registered = tracking.registered_name(cfg, model_name)
        mv = registry.alias_version(client, self.registered, alias)
        if mv is None:
            raise ServingError(f"{self.registered} has no @{alias}")
        self.alias, self.version = alias, str(mv.version)
        paths = registry.download(self.registered, self.version, dest / f"v{self.version}")
        meta = json.loads(paths["meta"].read_text())
        if meta.get("role", "intent_classifier") != "intent_classifier":
            raise ServingError(f"{self.registered} is a {meta.get('role')}: the service logs intents (traffic schema "
                               f"v1), so it serves intent classifiers only")
        self.precision = meta.get("precision", "fp32")
        tokenizer = AutoTokenizer.from_pretrained(paths["hf"])
        self.classifier = OnnxClassifier(paths["onnx"], tokenizer, meta["labels"], meta["max_length"],
                                         threads=cfg.serving.threads)
        self.model_field = f"{self.registered}/v{self.version}"
        self.event = "quantized_inference" if self.precision.startswith("int") else "inference"

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        probs = self.classifier.predict_proba(texts)
        labels = self.classifier.labels
        return [(labels[int(i)], float(p[i])) for i, p in zip(probs.argmax(1), probs, strict=True)]

    def describe(self) -> str:
        return f"v{self.version} (@{self.alias}, {self.precision})"


def _lower_priority(nice: int) -> None:
    """Linux schedules threads as tasks: this thread alone yields the CPU to the champion's."""
    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass


class _Runner:
    """A daemon thread that runs shadow calls; abandoned (not joined) when a call hangs past its deadline."""

    def __init__(self, nice: int):
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.nice = nice
        threading.Thread(target=self._loop, daemon=True, name="shadow-runner").start()

    def _loop(self) -> None:
        _lower_priority(self.nice)
        while True:
            fn, box, done = self.jobs.get()
            try:
                box["value"] = fn()
            except BaseException as exc:  # everything the shadow raises stays here
                box["error"] = exc
            done.set()

    def call(self, fn, timeout_s: float):
        box, done = {}, threading.Event()
        self.jobs.put((fn, box, done))
        if not done.wait(timeout_s):
            raise TimeoutError
        if "error" in box:
            raise box["error"]
        return box["value"]


class Mirror:
    """Bounded mirror queue and shadow workers; counts everything, raises nothing into the request path."""

    def __init__(self, service: Service):
        sc = service.cfg.serving
        self.service, self.timeout_s, self.nice = service, sc.shadow_timeout_ms / 1000, sc.shadow_nice
        self.queue: queue.Queue = queue.Queue(maxsize=sc.shadow_queue_size)
        self.stats: Counter = Counter()
        self.abandoned = 0
        self.latencies: deque = deque(maxlen=10000)
        for i in range(sc.shadow_workers):
            threading.Thread(target=self._work, daemon=True, name=f"shadow-worker-{i}").start()

    def submit(self, model: ServedModel, record: dict) -> None:
        if self.abandoned >= MAX_ABANDONED_RUNNERS:
            self.stats["skipped_disabled"] += 1
            return
        try:
            self.queue.put_nowait((model, record))
            self.stats["mirrored"] += 1
        except queue.Full:
            self.stats["mirrored"] += 1
            self.stats["dropped"] += 1

    def _work(self) -> None:
        _lower_priority(self.nice)
        runner = _Runner(self.nice)
        while True:
            model, record = self.queue.get()
            t0 = time.perf_counter()
            try:
                ((intent, conf),) = runner.call(lambda m=model, r=record: m.predict([r["text"]]), self.timeout_s)
            except TimeoutError:
                self.stats["timeouts"] += 1
                self.abandoned += 1
                if self.abandoned >= MAX_ABANDONED_RUNNERS:
                    log.error("shadow %s: %d calls hung past %.0f ms; mirroring stops until the next reload",
                              model.describe(), self.abandoned, 1000 * self.timeout_s)
                runner = _Runner(self.nice)  # the hung one keeps its thread; later mirrors get a fresh one
                continue
            except Exception as exc:
                self.stats["errors"] += 1
                if self.stats["errors"] <= 3 or self.stats["errors"] % 1000 == 0:
                    log.warning("shadow %s failed (%d errors so far): %s: %s", model.describe(), self.stats["errors"],
                                type(exc).__name__, exc)
                continue
            ms = (time.perf_counter() - t0) * 1000
            if ms > 1000 * self.timeout_s:  # answered, but later than the deadline: not an answer
                self.stats["timeouts"] += 1
                continue
            self.stats["answered"] += 1
            self.stats["agree"] += intent == record["intent"]
            self.latencies.append(ms)
            try:
                self.service.writer.write({**record, "event": "shadow_inference", "model": model.model_field,
                                           "intent": intent, "confidence": round(conf, 6), "latency_ms": round(ms, 3),
                                           "reviewed_label": None})
            except Exception:
                self.stats["log_errors"] += 1
                log.exception("could not log the shadow's answer")


class Service:
    def __init__(self, cfg: PipelineConfig, model_name: str, mirror: bool = True):
        cfg.model(model_name)
        self.cfg, self.model_name = cfg, model_name
        self.workdir = Path(tempfile.mkdtemp(prefix="qat-serving-"))
        self.champion = ServedModel(cfg, model_name, registry.CHAMPION, self.workdir)
        self.shadow = self._load_shadow()
        sc = cfg.serving
        self.writer = LogWriter(cfg.serving_log_dir, cfg.traffic.s3_endpoint_url, sc.log_flush_records,
                                sc.log_flush_seconds)
        self.mirroring = mirror
        self.stats: Counter = Counter()
        self.latencies: deque = deque(maxlen=10000)
        self.mirror = Mirror(self)
        # The shadow's Python work (tokenizing, logging) holds the GIL between its ONNX Runtime calls; a request
        # waiting for it would wait up to the 5 ms default switch interval. 0.5 ms hands it over sooner.
        sys.setswitchinterval(0.0005)
        self._reload_lock = threading.Lock()
        if sc.reload_interval_s > 0:
            threading.Thread(target=self._poll, args=(sc.reload_interval_s,), daemon=True, name="alias-poll").start()
        log.info("serving %s %s; %s; logging to %s", self.champion.registered, self.champion.describe(),
                 f"mirroring to {self.shadow.describe()}" if self.shadow and mirror else
                 ("mirroring off" if self.shadow else "no @shadow"), cfg.serving_log_dir)

    def _load_shadow(self) -> ServedModel | None:
        try:
            return ServedModel(self.cfg, self.model_name, SHADOW, self.workdir)
        except ServingError as exc:
            log.info("%s", exc)
            return None

    def answer(self, req: IntentRequest) -> dict:
        champion = self.champion  # one model per request, even if a reload swaps it meanwhile
        t0 = time.perf_counter()
        ((intent, conf),) = champion.predict([req.text])
        ms = (time.perf_counter() - t0) * 1000
        self.stats["requests"] += 1
        self.latencies.append(ms)
        record = {"schema_version": 1, "event": champion.event, "request_id": req.request_id or f"req-{uuid.uuid4().hex}",
                  "conversation_id": req.conversation_id or f"conv-{uuid.uuid4().hex[:16]}", "turn": req.turn,
                  "timestamp": datetime.now(UTC), "model": champion.model_field, "runtime": "onnxruntime",
                  "text": req.text, "intent": intent, "confidence": round(conf, 6), "latency_ms": round(ms, 3),
                  "reviewed_label": None, "locale": req.locale}
        self.writer.write(record)
        shadow = self.shadow
        if self.mirroring and shadow is not None:
            self.mirror.submit(shadow, record)
        return {"request_id": record["request_id"], "intent": intent, "confidence": conf,
                "model": champion.registered, "version": champion.version, "latency_ms": round(ms, 3)}

    def reload(self) -> dict:
        """Follow the aliases: load a version that @champion or @shadow now points at, then swap."""
        with self._reload_lock:
            client = tracking.configure(self.cfg)
            for alias in (registry.CHAMPION, SHADOW):
                mv = registry.alias_version(client, self.champion.registered, alias)
                current = self.champion if alias == registry.CHAMPION else self.shadow
                if mv is None:
                    if alias == SHADOW and self.shadow is not None:
                        log.info("@shadow removed: mirroring to %s stops", self.shadow.describe())
                        self.shadow = None
                    continue
                if current is None or current.version != str(mv.version):
                    loaded = ServedModel(self.cfg, self.model_name, alias, self.workdir)
                    log.info("@%s now %s (was %s)", alias, loaded.describe(), current.describe() if current else "none")
                    if alias == registry.CHAMPION:
                        self.champion = loaded
                    else:
                        self.shadow = loaded
                        self.mirror.abandoned = 0  # a new shadow gets a fresh budget of hung calls
            return self.health()

    def _poll(self, seconds: float) -> None:
        while True:
            time.sleep(seconds)
            try:
                self.reload()
            except Exception:  # the registry being down must not stop serving
                log.exception("alias poll failed; serving the versions already loaded")

    def health(self) -> dict:
        disabled = self.mirror.abandoned >= MAX_ABANDONED_RUNNERS
        return {"status": "ok", "model": self.champion.registered, "champion": self.champion.version,
                "shadow": self.shadow.version if self.shadow else None, "mirroring": self.mirroring,
                "shadow_state": "disabled: too many hung calls" if disabled else
                ("mirroring" if self.shadow and self.mirroring else "idle"),
                "mirror_queue": self.mirror.queue.qsize()}

    def metrics_text(self) -> str:
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        m, labels = self.mirror.stats, f'model="{self.champion.registered}"'
        lines = [f"qat_requests_total{{{labels}}} {self.stats['requests']}"]
        for q in (0.5, 0.95, 0.99):
            lines.append(f'qat_champion_latency_ms{{{labels},quantile="{q}"}} {np.percentile(lat, 100 * q):.3f}')
        for key in ("mirrored", "answered", "errors", "timeouts", "dropped", "skipped_disabled", "log_errors"):
            lines.append(f"qat_shadow_{key}_total{{{labels}}} {m[key]}")
        lines.append(f"qat_shadow_agreement{{{labels}}} {m['agree'] / m['answered'] if m['answered'] else 0:.4f}")
        lines.append(f"qat_log_records_total{{{labels}}} {self.writer.stats['records']}")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.writer.close()


class IntentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Annotated[str, Field(min_length=1, max_length=4000)]
    conversation_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    turn: Annotated[int, Field(ge=0, le=500)] = 0
    request_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    locale: Annotated[str, Field(max_length=35)] | None = None

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is blank")
        return v


class MirroringSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool


def create_app(service: Service):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()  # the last buffered records reach the log

    app = FastAPI(title="MangaAssist intent service", description=__doc__, lifespan=lifespan)

    @app.post("/v1/intent")
    def intent(req: IntentRequest) -> dict:
        return service.answer(req)

    @app.get("/health")
    def health() -> dict:
        return service.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return service.metrics_text()

    @app.post("/admin/mirroring")
    def mirroring(switch: MirroringSwitch) -> dict:
        service.mirroring = switch.enabled
        log.info("mirroring %s", "on" if switch.enabled else "off")
        return service.health()

    @app.post("/admin/reload")
    def reload() -> dict:
        return service.reload()

    return app


def serve(cfg: PipelineConfig, model_name: str, host: str | None = None, port: int | None = None,
          mirror: bool = True) -> None:
    import uvicorn

    service = Service(cfg, model_name, mirror)
    host, port = host or cfg.serving.host, cfg.serving.port if port is None else port
    print(f"serving {service.champion.registered} {service.champion.describe()} on http://{host}:{port}", flush=True)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning", access_log=False)


def replay(cfg: PipelineConfig, model_name: str, records, out_root: str, champion: str = registry.CHAMPION,
           shadow: str = SHADOW, progress: bool = True) -> dict:
    """Send logged records through champion and shadow in process, one request at a time, each model timed on its
    own, and write both answers (keeping ids, timestamps, locale and reviewed labels) under `out_root`."""
    workdir = Path(tempfile.mkdtemp(prefix="qat-replay-"))
    models = [ServedModel(cfg, model_name, champion, workdir), ServedModel(cfg, model_name, shadow, workdir)]
    writer = LogWriter(out_root, cfg.traffic.s3_endpoint_url, flush_records=5000, flush_seconds=3600, prefix="replay")
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc=f"replaying through v{models[0].version} and v{models[1].version}",
                        unit="request", mininterval=5)
    agree = 0
    try:
        for rec in iterator:
            answers = []
            for model in models:
                t0 = time.perf_counter()
                ((intent, conf),) = model.predict([rec.text])
                answers.append(intent)
                writer.write({**rec.model_dump(), "event": model.event if model is models[0] else "shadow_inference",
                              "model": model.model_field, "runtime": "onnxruntime", "intent": intent,
                              "confidence": round(conf, 6), "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                              "reviewed_label": rec.reviewed_label if model is models[0] else None})
            agree += answers[0] == answers[1]
    finally:
        writer.close()
    n = len(records)
    log.info("replayed %d requests through %s and %s: agreement %.3f", n, models[0].describe(), models[1].describe(),
             agree / n if n else 0.0)
    return {"requests": n, "champion_version": models[0].version, "shadow_version": models[1].version,
            "agreement": agree / n if n else 0.0, "files": writer.stats["files"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat_tasks.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--no-mirror", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(load_config(args.config), args.model, args.host, args.port, not args.no_mirror)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

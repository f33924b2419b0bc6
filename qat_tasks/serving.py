"""The serving component: an HTTP service that answers with @champion and mirrors every request to @shadow.

  POST /v1/intent          {"text", "conversation_id"?, "turn"?, "request_id"?, "locale"?} -> the champion's answer
  GET  /health             versions served, mirroring on/off, shadow state
  GET  /metrics            Prometheus text: requests, champion latency, mirrored / answered / errors / timeouts /
                           dropped mirrors, agreement, log records written
  POST /admin/mirroring    {"enabled": bool}
  POST /admin/reload       re-resolve the aliases now (they are also polled every serving.reload_interval_s)

The champion answers in the request path. The mirror goes to a bounded queue that the request never waits on (full:
the mirror is dropped and counted). Shadow workers run at a lower CPU priority and give each call a deadline: an
exception is an error, a late answer a timeout. A call that hangs keeps its thread; later mirrors run on fresh ones
(at most MAX_STUCK_CALLS hung at once, beyond that mirrors are dropped until one returns). Both answers are logged
in the traffic schema, so the service's logs are the next quarter's calibration source.

`replay()` is the offline mode: logged records sent through champion and shadow in process, one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import shutil
import socket
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
from qat_tasks.config import ConfigError, PipelineConfig, load_config
from qat_tasks.schema import INTENTS
from qat_tasks.traffic_log import LogWriter

log = logging.getLogger(__name__)

SHADOW = "shadow"
SERVED_ROLE = "intent_classifier"
MAX_STUCK_CALLS = 4  # hung shadow calls (each holding a thread) per worker before mirrors are dropped
# Shadow threads in SCHED_IDLE (see _lower_priority): set by serve() for the service's own process. Tests and
# replays keep the nice value alone, so a busy CI machine cannot starve their shadow past its deadline.
IDLE_SHADOWS = False


class ServingError(RuntimeError):
    """The service cannot serve what was asked (missing alias, wrong role); the message says which."""


def _not_served(name: str, role: str) -> ServingError:
    return ServingError(f"{name} is a {role}: the traffic schema v1 records intents, so the escalation detector "
                        f"and reranker are not served by this component yet (only {SERVED_ROLE} models are)")


class ServedModel:
    """One registered version, loaded by alias (or version number), served by ONNX Runtime as the pipeline
    evaluated it."""

    def __init__(self, cfg: PipelineConfig, model_name: str, alias: str, dest: Path):
        from transformers import AutoTokenizer

        from qat_tasks.modeling import OnnxClassifier

        role = cfg.model(model_name).role
        self.registered = tracking.registered_name(cfg, model_name)
        if role != SERVED_ROLE:
            raise _not_served(self.registered, role)
        client = tracking.configure(cfg)
        mv = (client.get_model_version(self.registered, alias) if alias.isdigit()
              else registry.alias_version(client, self.registered, alias))
        if mv is None:
            raise ServingError(f"{self.registered} has no @{alias} in the registry at {cfg.tracking_uri}")
        self.alias, self.version = alias, str(mv.version)
        paths = registry.download(self.registered, self.version, dest / f"{alias}-v{self.version}")
        meta = json.loads(paths["meta"].read_text())
        if meta.get("role", SERVED_ROLE) != SERVED_ROLE:
            raise _not_served(f"{self.registered} v{self.version}", meta["role"])
        unknown = sorted(set(meta["labels"]) - set(INTENTS))
        if unknown:
            raise ServingError(f"{self.registered} v{self.version} predicts {unknown}, which are not intents of the "
                               f"traffic schema v1: its answers could not be logged")
        self.precision = meta.get("precision", "fp32")
        self.role = meta.get("role", SERVED_ROLE)
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
        self.model_field = f"{self.registered}/v{self.version}"
        self.event = "quantized_inference" if self.precision.startswith("int") else "inference"

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        from qat_tasks.modeling import softmax, tokenize

        clf = self.classifier
        with self._tokenizer_lock:
            enc = tokenize(clf.tokenizer, texts, clf.max_length)
        feeds = {n: enc[n].astype(np.int64) for n in clf.input_names}
        probs = softmax(clf.session.run(["logits"], feeds)[0] / self.temperature)
        return [(clf.labels[int(i)], min(1.0, float(p[i]))) for i, p in zip(probs.argmax(1), probs, strict=True)]

    def describe(self) -> str:
        return f"v{self.version} (@{self.alias}, {self.precision}, temperature {self.temperature:.2f})"


def _lower_priority(nice: int) -> None:
    """Linux schedules threads as tasks, so this lowers the calling thread alone (and threads it starts later,
    such as ONNX Runtime's pool): the champion's threads get the CPU first. Elsewhere it would renice the whole
    process, so it does nothing.

    In the service (IDLE_SHADOWS) the thread also goes to SCHED_IDLE, which a waking champion thread always
    preempts at once: measured with bench/shadow_load.py on an idle 2-core machine, mirroring added 21.6 % to the
    champion's P95 at nice 10 and 4.4 % at SCHED_IDLE (an A/A run: 2.0 %). The price: on a saturated machine the
    shadow waits for idle CPU, and its late answers count as timeouts."""
    if nice and sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            if IDLE_SHADOWS:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.warning("could not lower the shadow's CPU priority (nice %d): %s", nice, exc)


def _in_thread(fn, nice: int = 0):
    """fn() on a fresh thread at `nice`, waited for: a shadow session created there starts its threads niced."""
    box: dict = {}

    def run() -> None:
        _lower_priority(nice)
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, name="model-loader")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class _Call:
    """One shadow call handed to a runner thread; the runner times it, the caller waits with a deadline."""

    def __init__(self, fn):
        self.fn, self.done = fn, threading.Event()
        self.value = self.error = None
        self.ms = 0.0


class _Runner:
    """A daemon thread that runs shadow calls one at a time."""

    def __init__(self, nice: int):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.last: _Call | None = None  # set by the submitting thread, so busy() never races the runner
        threading.Thread(target=self._loop, args=(nice,), daemon=True, name="shadow-runner").start()

    def submit(self, call: _Call) -> None:
        self.last = call
        self.inbox.put(call)

    def _loop(self, nice: int) -> None:
        _lower_priority(nice)
        while True:
            call = self.inbox.get()
            t0 = time.perf_counter()
            try:
                call.value = call.fn()
            except BaseException as exc:  # whatever the shadow raises stays on this thread
                call.error = exc
            call.ms = (time.perf_counter() - t0) * 1000
            call.done.set()

    def busy(self) -> bool:
        return self.last is not None and not self.last.done.is_set()


class _Saturated(Exception):
    """Every runner this worker may hold is stuck in a hung call."""


class _Executor:
    """Runs calls with a deadline on reusable runner threads; one whose call hangs is set aside (not reused until
    the call returns) and a fresh runner takes the next call, up to `max_stuck` set aside at once."""

    def __init__(self, nice: int, max_stuck: int):
        self.nice, self.max_stuck = nice, max_stuck
        self.idle: list[_Runner] = []
        self.stuck: list[_Runner] = []

    def call(self, fn, timeout_s: float) -> _Call:
        returned = [r for r in self.stuck if not r.busy()]
        if returned:
            self.stuck = [r for r in self.stuck if r.busy()]
            self.idle.extend(returned)
        if len(self.stuck) >= self.max_stuck:
            raise _Saturated
        runner = self.idle.pop() if self.idle else _Runner(self.nice)
        call = _Call(fn)
        runner.submit(call)
        if not call.done.wait(timeout_s):
            self.stuck.append(runner)
            raise TimeoutError
        self.idle.append(runner)
        return call


class Counters:
    """Counters shared by request threads and shadow workers (a Counter's += is not atomic across threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._c: Counter = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self._c)


class Mirror:
    """The bounded mirror queue and the shadow workers. Nothing here raises into the request path."""

    def __init__(self, service: Service):
        sc = service.cfg.serving
        self.service, self.timeout_s, self.nice = service, sc.shadow_timeout_ms / 1000, sc.shadow_nice
        self.queue: queue.Queue = queue.Queue(maxsize=sc.shadow_queue_size)
        self.counts = Counters()
        self.executors = [_Executor(self.nice, MAX_STUCK_CALLS) for _ in range(sc.shadow_workers)]
        for i, ex in enumerate(self.executors):
            threading.Thread(target=self._work, args=(ex,), daemon=True, name=f"shadow-worker-{i}").start()

    def submit(self, model: ServedModel, record: dict) -> None:
        """Hand a request to the shadow; never blocks."""
        self.counts.add("mirrored")
        try:
            self.queue.put_nowait((model, record))
        except queue.Full:
            self.counts.add("dropped")

    def stuck(self) -> int:
        """Shadow calls hung past their deadline that have not returned yet."""
        return sum(r.busy() for ex in self.executors for r in list(ex.stuck))

    def _work(self, executor: _Executor) -> None:
        _lower_priority(self.nice)
        while True:
            model, record = self.queue.get()
            try:
                self._mirror(executor, model, record)
            except Exception:  # a bug here must not end the worker: later mirrors still run
                self.counts.add("errors")
                log.exception("mirroring a request to the shadow failed")

    def _mirror(self, executor: _Executor, model: ServedModel, record: dict) -> None:
        try:
            call = executor.call(lambda: model.predict([record["text"]]), self.timeout_s)
        except _Saturated:
            self.counts.add("dropped")
            return
        except TimeoutError:
            self.counts.add("timeouts")
            n = self.counts.snapshot()["timeouts"]
            if n <= 3 or n % 1000 == 0:
                log.warning("shadow %s did not answer within %.0f ms (%d timeouts so far)", model.describe(),
                            1000 * self.timeout_s, n)
            return
        if call.error is not None:
            self.counts.add("errors")
            n = self.counts.snapshot()["errors"]
            if n <= 3 or n % 1000 == 0:
                log.warning("shadow %s failed (%d errors so far): %s: %s", model.describe(), n,
                            type(call.error).__name__, call.error)
            return
        ((intent, conf),) = call.value
        self.counts.add("answered")
        self.counts.add("agree", int(intent == record["intent"]))
        self.service.log_record({**record, "event": "shadow_inference", "model": model.model_field, "intent": intent,
                                 "confidence": round(conf, 6), "latency_ms": round(call.ms, 3)})


class Service:
    """Champion, shadow, mirror, log writer and alias polling; the HTTP layer (create_app) only calls into it."""

    def __init__(self, cfg: PipelineConfig, model_name: str, mirror: bool = True):
        role = cfg.model(model_name).role
        if role != SERVED_ROLE:
            raise _not_served(tracking.registered_name(cfg, model_name), role)
        self.cfg, self.model_name, self.mirroring = cfg, model_name, mirror
        self.workdir = Path(tempfile.mkdtemp(prefix="qat-serving-"))
        self.champion = ServedModel(cfg, model_name, registry.CHAMPION, self.workdir)
        self.shadow = self._load_shadow()
        sc = cfg.serving
        self.writer = LogWriter(cfg.serving_log_dir, cfg.traffic.s3_endpoint_url, sc.log_flush_records,
                                sc.log_flush_seconds)
        self.counts = Counters()
        self.latencies: deque = deque(maxlen=10_000)  # the champion's, for the summary's quantiles
        self.mirror = Mirror(self)
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        if sc.reload_interval_s > 0:
            threading.Thread(target=self._poll, args=(sc.reload_interval_s,), daemon=True, name="alias-poll").start()
        log.info("%s", self.describe())

    def describe(self) -> str:
        shadow = self.shadow
        if shadow is None:
            mirroring = "no @shadow to mirror to"
        else:
            mirroring = (f"mirroring to {shadow.describe()} with a {self.cfg.serving.shadow_timeout_ms:.0f} ms "
                         f"deadline" + ("" if self.mirroring else " (off)"))
        return (f"serving {self.champion.registered} {self.champion.describe()}; {mirroring}; logging to "
                f"{self.cfg.serving_log_dir}")

    def _load_shadow(self) -> ServedModel | None:
        """The @shadow version, or None (logged) when there is none or it cannot be loaded: the champion serves
        either way."""
        try:  # created on a niced thread, so a multi-threaded ONNX Runtime pool starts niced too
            return _in_thread(lambda: ServedModel(self.cfg, self.model_name, SHADOW, self.workdir),
                              self.cfg.serving.shadow_nice)
        except ServingError as exc:
            log.info("%s: nothing to mirror to", exc)
        except Exception as exc:
            log.warning("could not load @shadow of %s (%s: %s): not mirroring", self.champion.registered,
                        type(exc).__name__, exc)
        return None

    def answer(self, req: IntentRequest) -> dict:
        champion = self.champion  # one model for the whole request, even if a reload swaps it meanwhile
        t0 = time.perf_counter()
        ((intent, conf),) = champion.predict([req.text])
        ms = (time.perf_counter() - t0) * 1000
        self.counts.add("requests")
        self.latencies.append(ms)
        record = {"schema_version": 1, "event": champion.event,
                  "request_id": req.request_id or f"req-{uuid.uuid4().hex}",
                  "conversation_id": req.conversation_id or f"conv-{uuid.uuid4().hex[:16]}", "turn": req.turn,
                  "timestamp": datetime.now(UTC), "model": champion.model_field, "runtime": "onnxruntime",
                  "text": req.text, "intent": intent, "confidence": round(conf, 6), "latency_ms": round(ms, 3),
                  "reviewed_label": None, "locale": req.locale}
        self.log_record(record)
        shadow = self.shadow
        if self.mirroring and shadow is not None:
            self.mirror.submit(shadow, record)
        return {"request_id": record["request_id"], "intent": intent, "confidence": conf,
                "model": champion.registered, "version": champion.version, "latency_ms": round(ms, 3)}

    def log_record(self, record: dict) -> None:
        """Log without failing the caller: a record that cannot be logged is counted, the answer still goes out."""
        try:
            self.writer.write(record)
        except Exception as exc:
            self.counts.add("log_errors")
            log.warning("could not log a %s record: %s", record.get("event"), exc)

    def reload(self) -> dict:
        """Follow the aliases: load the version @champion or @shadow now points at, then swap it in."""
        with self._reload_lock:
            client = tracking.configure(self.cfg)
            name = self.champion.registered
            mv = registry.alias_version(client, name, registry.CHAMPION)
            if mv is None:
                log.warning("%s has no @champion any more; still serving %s", name, self.champion.describe())
            elif str(mv.version) != self.champion.version:
                loaded = ServedModel(self.cfg, self.model_name, registry.CHAMPION, self.workdir)
                log.info("@champion moved: now serving %s %s (was v%s)", name, loaded.describe(),
                         self.champion.version)
                self.champion = loaded
            mv = registry.alias_version(client, name, SHADOW)
            if mv is None:
                if self.shadow is not None:
                    log.info("@shadow removed: mirroring to %s stops", self.shadow.describe())
                    self.shadow = None
            elif self.shadow is None or str(mv.version) != self.shadow.version:
                # A version that fails to load is retried on the next poll; meanwhile nothing is mirrored (the
                # old shadow is no longer the one under review).
                loaded = self._load_shadow()
                if loaded is not None:
                    log.info("@shadow moved: now mirroring to %s (was %s)", loaded.describe(),
                             f"v{self.shadow.version}" if self.shadow else "none")
                self.shadow = loaded
            return self.health()

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.reload()
            except Exception as exc:  # a registry outage must not stop serving
                log.warning("could not check the aliases (%s: %s); serving the versions already loaded",
                            type(exc).__name__, exc)

    def health(self) -> dict:
        shadow, stuck = self.shadow, self.mirror.stuck()
        if shadow is None:
            state = "no shadow"
        elif not self.mirroring:
            state = "mirroring off"
        elif stuck >= MAX_STUCK_CALLS * len(self.mirror.executors):
            state = f"stalled: {stuck} shadow calls hung; mirrors are dropped until one returns"
        else:
            state = "mirroring" + (f" ({stuck} shadow calls hung)" if stuck else "")
        return {"status": "ok", "model": self.champion.registered, "champion": self.champion.version,
                "champion_precision": self.champion.precision, "shadow": shadow.version if shadow else None,
                "shadow_precision": shadow.precision if shadow else None, "mirroring": self.mirroring,
                "shadow_state": state, "mirror_queue": self.mirror.queue.qsize()}

    def metrics_text(self) -> str:
        c, m = self.counts.snapshot(), self.mirror.counts.snapshot()
        lat = np.array(self.latencies)
        lbl = f'model="{self.champion.registered}",version="{self.champion.version}"'
        out: list[str] = []

        def metric(name: str, kind: str, text: str, value) -> None:
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name}{{{lbl}}} {value}"])

        metric("qat_requests_total", "counter", "Requests answered by the champion.", c["requests"])
        out += ["# HELP qat_champion_latency_ms Champion inference time per request (last 10000 requests).",
                "# TYPE qat_champion_latency_ms summary"]
        out += [f'qat_champion_latency_ms{{{lbl},quantile="{q}"}} '
                f'{np.percentile(lat, 100 * q) if lat.size else float("nan"):.3f}' for q in (0.5, 0.95, 0.99)]
        out += [f"qat_champion_latency_ms_sum{{{lbl}}} {lat.sum():.3f}",
                f"qat_champion_latency_ms_count{{{lbl}}} {lat.size}"]
        for key, text in {"mirrored": "Requests handed to the shadow.",
                          "answered": "Shadow answers within the deadline.",
                          "errors": "Shadow calls that raised.",
                          "timeouts": "Shadow calls past the deadline (late or hung).",
                          "dropped": "Mirrors dropped: queue full, or every shadow thread hung."}.items():
            metric(f"qat_shadow_{key}_total", "counter", text, m[key])
        metric("qat_shadow_agreement", "gauge", "Share of shadow answers equal to the champion's.",
               f"{m['agree'] / m['answered']:.4f}" if m["answered"] else "NaN")
        metric("qat_log_records_total", "counter", "Traffic records written to the log.", self.writer.stats["records"])
        metric("qat_log_errors_total", "counter", "Records that could not be logged.",
               c["log_errors"] + self.writer.stats["dropped"])
        metric("qat_log_flush_errors_total", "counter", "Log flushes that failed (records kept, retried).",
               self.writer.stats["flush_errors"])
        metric("qat_log_pending_records", "gauge", "Records buffered, not yet written.", self.writer.pending)
        metric("qat_mirroring_enabled", "gauge", "Whether requests are mirrored now.",
               int(self.mirroring and self.shadow is not None))
        return "\n".join(out) + "\n"

    def close(self) -> None:
        self._stop.set()
        try:
            self.writer.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)  # sessions are in memory; the downloads are not needed
        log.info("stopped; %d log records written in %d files", self.writer.stats["records"],
                 self.writer.stats["files"])


class IntentRequest(BaseModel):
    """The request body; the limits are the traffic schema's, so every accepted request can be logged."""

    model_config = ConfigDict(extra="forbid")

    text: Annotated[str, Field(min_length=1, max_length=4000)]
    conversation_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    turn: Annotated[int, Field(ge=0, le=500)] = 0
    request_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    locale: Annotated[str, Field(min_length=1, max_length=35)] | None = None

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
    from fastapi import FastAPI, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()  # flushes the last log records

    app = FastAPI(title="MangaAssist intent service", description=__doc__, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{field}: unknown field" if err["type"] == "extra_forbidden" else f"{field}: {err['msg']}")
        return JSONResponse(status_code=422, content={"error": "; ".join(problems),
                                                      "detail": jsonable_encoder(exc.errors())})

    @app.post("/v1/intent")
    def intent(req: IntentRequest) -> dict:  # a plain def: FastAPI runs it on its thread pool, off the event loop
        return service.answer(req)

    @app.get("/health")
    def health() -> dict:
        return service.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return service.metrics_text()

    @app.post("/admin/mirroring")
    def mirroring(switch: MirroringSwitch) -> dict:
        if switch.enabled != service.mirroring:
            log.info("mirroring turned %s", "on" if switch.enabled else "off")
        service.mirroring = switch.enabled
        return service.health()

    @app.post("/admin/reload")
    def reload():
        try:
            return service.reload()
        except Exception as exc:  # the old versions keep serving; say why the new ones did not load
            log.warning("reload failed: %s: %s", type(exc).__name__, exc)
            return JSONResponse(status_code=503, content={"error": f"reload failed ({type(exc).__name__}: {exc}); "
                                                                   f"still serving the loaded versions",
                                                          **service.health()})

    return app


def make_server(service: Service, host: str, port: int):
    """A uvicorn server for the service and the socket it will listen on (bound now: port 0 picks a free port,
    and the URL is known before serving starts). Returns (server, socket, url)."""
    import uvicorn

    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    bound = sock.getsockname()[1]
    return uvicorn.Server(config), sock, f"http://{f'[{host}]' if ':' in host else host}:{bound}"


def serve(cfg: PipelineConfig, model_name: str, host: str | None = None, port: int | None = None,
          mirror: bool = True) -> None:
    """Run the service until interrupted (SIGINT/SIGTERM flush the logs before exit)."""
    # A request waiting for the GIL while a shadow thread runs Python (tokenizing, logging) waits up to the switch
    # interval: 0.5 ms instead of 5 ms (P95 overhead 9.8 % -> 4.4 % with SCHED_IDLE shadows, same bench). Set here,
    # in the service's own process, not in Service, which tests and replays create in theirs.
    sys.setswitchinterval(0.0005)
    global IDLE_SHADOWS
    IDLE_SHADOWS = True
    service = Service(cfg, model_name, mirror)
    server, sock, url = make_server(service, host or cfg.serving.host, cfg.serving.port if port is None else port)
    print(f"{service.describe()}\nlistening on {url} (POST {url}/v1/intent, GET {url}/health)", flush=True)
    server.run(sockets=[sock])


def replay(cfg: PipelineConfig, model_name: str, records, out_root: str, champion: str = registry.CHAMPION,
           shadow: str = SHADOW, progress: bool = True) -> dict:
    """Send logged records through champion and shadow in process, one request at a time, each model timed on its
    own, and log both answers under `out_root` as the live service would, keeping each record's request_id,
    conversation_id, turn, timestamp, locale and reviewed_label. A shadow error or an answer past
    serving.shadow_timeout_ms is counted and not logged, as live."""
    workdir = Path(tempfile.mkdtemp(prefix="qat-replay-"))
    models = [ServedModel(cfg, model_name, alias, workdir) for alias in (champion, shadow)]
    limit_ms = cfg.serving.shadow_timeout_ms
    counts: Counter = Counter()
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc=f"replaying through v{models[0].version} and v{models[1].version}",
                        unit="request", mininterval=5)
    writer = LogWriter(out_root, cfg.traffic.s3_endpoint_url, flush_records=5000, flush_seconds=60, prefix="replay")
    try:
        for rec in iterator:
            base = {**rec.model_dump(), "runtime": "onnxruntime"}
            answers = []
            for model in models:
                t0 = time.perf_counter()
                try:
                    ((intent, conf),) = model.predict([rec.text])
                except Exception as exc:
                    if model is models[0]:
                        raise ServingError(f"champion {models[0].describe()} failed on request {rec.request_id}: "
                                           f"{type(exc).__name__}: {exc}") from exc
                    counts["errors"] += 1
                    continue
                ms = (time.perf_counter() - t0) * 1000
                if model is models[1] and ms > limit_ms:
                    counts["timeouts"] += 1
                    continue
                answers.append(intent)
                writer.write({**base, "event": model.event if model is models[0] else "shadow_inference",
                              "model": model.model_field, "intent": intent, "confidence": round(conf, 6),
                              "latency_ms": round(ms, 3)})
            counts["requests"] += 1
            if len(answers) == 2:
                counts["answered"] += 1
                counts["agree"] += answers[0] == answers[1]
    finally:
        writer.close()
        shutil.rmtree(workdir, ignore_errors=True)
    agreement = counts["agree"] / counts["answered"] if counts["answered"] else 0.0
    log.info("replayed %d logged requests through champion %s and shadow %s: %d answered by the shadow, %d errors, "
             "%d timeouts, agreement %.3f; %d records in %s", counts["requests"], models[0].describe(),
             models[1].describe(), counts["answered"], counts["errors"], counts["timeouts"], agreement,
             writer.stats["records"], out_root)
    return {"requests": counts["requests"], "answered": counts["answered"], "errors": counts["errors"],
            "timeouts": counts["timeouts"], "agreement": agreement, "champion_version": models[0].version,
            "shadow_version": models[1].version, "records": writer.stats["records"], "files": writer.stats["files"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat_tasks.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config (default: $QAT_CONFIG, else configs/demo.yaml)")
    parser.add_argument("--model", required=True, help="configured model name, e.g. intent-classifier")
    parser.add_argument("--host", help="default: serving.host")
    parser.add_argument("--port", type=int, help="default: serving.port (0: any free port)")
    parser.add_argument("--no-mirror", action="store_true", help="start with mirroring off (POST /admin/mirroring)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        serve(load_config(args.config), args.model, args.host, args.port, not args.no_mirror)
    except (ConfigError, ServingError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

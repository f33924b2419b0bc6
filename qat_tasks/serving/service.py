"""The serving component: an HTTP service that answers with @champion and mirrors every request to @shadow.

It holds the champion, the shadow, the mirror, the log writer and the alias polling; the HTTP routes (`app`) only
call into it.

The champion answers in the request path. The mirror goes to a bounded queue that the request never waits on (full:
the mirror is dropped and counted). Shadow workers run at a lower CPU priority and give each call a deadline: an
exception is an error, a late answer a timeout. A call that hangs keeps its thread; later mirrors run on fresh ones
(at most MAX_STUCK_CALLS hung at once, beyond that mirrors are dropped until one returns). Both answers are logged
in the traffic schema, so the service's logs are the next quarter's calibration source.

The shadow's threads are `executor` and `mirror`; the offline mode is `replay`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from qat_tasks.core import registry, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.schema import SCHEMA_VERSION, SERVED_ROLES
from qat_tasks.data.pii import scrub
from qat_tasks.data.traffic_log import LogWriter, refuse_bundled_sample
from qat_tasks.serving.executor import MAX_STUCK_CALLS, in_thread
from qat_tasks.serving.mirror import Counters, Mirror
from qat_tasks.serving.models import ServedModel, ServingError, not_served

log = logging.getLogger(__name__)


class Service:
    """Champion, shadow, mirror, log writer and alias polling; the HTTP layer (create_app) only calls into it."""

    def __init__(self, cfg: PipelineConfig, model_name: str, mirror: bool = True):
        role = cfg.model(model_name).role
        if role not in SERVED_ROLES:
            raise not_served(tracking.registered_name(cfg, model_name), role)
        self.cfg, self.model_name, self.mirroring = cfg, model_name, mirror
        refuse_bundled_sample(cfg.serving_log_dir)
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
            return in_thread(lambda: ServedModel(self.cfg, self.model_name, registry.SHADOW, self.workdir),
                              self.cfg.serving.shadow_nice)
        except ServingError as exc:
            log.info("%s: nothing to mirror to", exc)
        except Exception as exc:
            log.warning("could not load @shadow of %s (%s: %s): not mirroring", self.champion.registered,
                        type(exc).__name__, exc)
        return None

    def answer(self, req) -> dict:
        """The champion's answer to one request (`app.IntentRequest`), logged and mirrored."""
        champion = self.champion  # one model for the whole request, even if a reload swaps it meanwhile
        t0 = time.perf_counter()
        ((intent, conf),) = champion.predict([req.text])
        ms = (time.perf_counter() - t0) * 1000
        scrubbed: Counter = Counter()
        text = scrub(req.text, scrubbed)  # what reaches the log: never the customer's personal data
        self.counts.add("requests")
        self.latencies.append(ms)
        record = {"schema_version": SCHEMA_VERSION, "event": champion.event,
                  "request_id": req.request_id or f"req-{uuid.uuid4().hex}",
                  "conversation_id": req.conversation_id or f"conv-{uuid.uuid4().hex[:16]}", "turn": req.turn,
                  "timestamp": datetime.now(UTC), "model": champion.model_field, "runtime": "onnxruntime",
                  "text": text, "intent": intent, "confidence": round(conf, 6), "latency_ms": round(ms, 3),
                  "reviewed_label": None, "locale": req.locale, "pii_scrubbed": dict(scrubbed) or None}
        self.log_record(record)
        shadow = self.shadow
        if self.mirroring and shadow is not None:
            self.mirror.submit(shadow, record, req.text)
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
            mv = registry.alias_version(client, name, registry.SHADOW)
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


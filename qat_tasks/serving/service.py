"""The serving component: an HTTP service that answers with each hosted encoder's @champion and mirrors every
request to its @shadow.

It hosts the intent classifier, the escalation detector and the reranker (or those named), one model per role. The
champions answer in the request path, in this process. The mirrors go to the shadow process (`mirror`,
`shadow_worker`) through a bounded queue that the request never waits on. Both answers are logged in the traffic
schema: the intent classifier's at the log root (the next quarter's calibration source), the others' in their
model's own folder below it. Aliases are polled, so a promotion or rollback is served without a restart.

The HTTP routes are `app`; the offline mode is `replay`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from qat_tasks.core import registry, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.schema import SCHEMA_VERSION, SERVED_ROLES
from qat_tasks.data.traffic_log import refuse_bundled_sample
from qat_tasks.promotion.traffic import log_root
from qat_tasks.serving.logs import RecordWriter
from qat_tasks.serving.metrics import ServiceMetrics
from qat_tasks.serving.mirror import Mirror
from qat_tasks.serving.models import ServedModel, ServingError, fetch, not_served
from qat_tasks.serving.requests import ENDPOINTS, ROLE_OF, answer_fields, inputs, logged_request, response

log = logging.getLogger(__name__)


class NotHosted(ServingError):
    """A request for a role this service does not host, or whose @champion is not loaded (yet)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Hosted:
    """One hosted model: its configured name, role, where it logs, and its champion (None until one loads)."""

    def __init__(self, cfg: PipelineConfig, name: str):
        self.name, self.role = name, cfg.model(name).role
        self.registered = tracking.registered_name(cfg, name)
        self.root = log_root(cfg.serving_log_dir, name, self.role)
        self.champion: ServedModel | None = None


def hosted_names(cfg: PipelineConfig, models: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The configured models to host: those named, else every served encoder of the config; one per role."""
    if isinstance(models, str):
        models = [models]
    names = list(dict.fromkeys(models)) if models else [m.name for m in cfg.models if m.role in SERVED_ROLES]
    by_role: dict[str, str] = {}
    for name in names:
        role = cfg.model(name).role
        if role not in SERVED_ROLES:
            raise not_served(tracking.registered_name(cfg, name), role)
        if role in by_role:
            raise ServingError(f"{by_role[role]} and {name} are both {role}s; one service answers {ENDPOINTS[role]} "
                               f"with one model: pick one with --model")
        by_role[role] = name
    if not names:
        raise ServingError(f"profile {cfg.profile} configures no encoder to serve ({', '.join(SERVED_ROLES)})")
    return names


class Service:
    """Champions, the shadow process, log writers, metrics and alias polling; the HTTP layer only calls into it.

    `models`: a configured name or names (required to load), or None for every served encoder of the config (one
    without a @champion is skipped until a poll finds one). `idle_shadow` puts the shadow process under SCHED_IDLE
    (the service does; tests keep it niced only, so a busy machine cannot starve their shadow past its deadline).
    `shadow_factory` builds the shadow's models in the shadow process (default ServedModel)."""

    def __init__(self, cfg: PipelineConfig, models: str | list[str] | None = None, mirror: bool = True, *,
                 idle_shadow: bool = False, shadow_factory=None):
        names = hosted_names(cfg, models)
        self.cfg, self.mirroring = cfg, mirror
        refuse_bundled_sample(cfg.serving_log_dir)
        self.workdir = Path(tempfile.mkdtemp(prefix="qat-serving-"))
        self.hosted = {name: Hosted(cfg, name) for name in names}
        self.by_role = {h.role: h for h in self.hosted.values()}
        for h in self.hosted.values():
            try:
                h.champion = ServedModel.load(cfg, h.name, registry.CHAMPION, self.workdir)
            except ServingError as exc:
                if models:
                    raise
                log.warning("%s: %s is not served until a @champion appears", exc, h.name)
        if not any(h.champion for h in self.hosted.values()):
            raise ServingError(f"none of {', '.join(names)} has a loadable @champion in {cfg.tracking_uri}")
        sc = cfg.serving
        self.writers = {root: RecordWriter(root, cfg.traffic.s3_endpoint_url, sc.log_flush_records,
                                           sc.log_flush_seconds) for root in {h.root for h in self.hosted.values()}}
        self.refused = 0  # records the schema refused (a bug, counted in qat_log_errors_total)
        self.metrics = ServiceMetrics(self._scrape)
        self.mirror = Mirror({"timeout_ms": sc.shadow_timeout_ms, "workers": sc.shadow_workers,
                              "queue_size": sc.shadow_queue_size, "nice": sc.shadow_nice, "idle": idle_shadow,
                              "threads": sc.threads, "endpoint_url": cfg.traffic.s3_endpoint_url,
                              "yield": sc.shadow_yield,
                              "flush_records": sc.log_flush_records, "flush_seconds": sc.log_flush_seconds,
                              "factory": shadow_factory}, self.metrics)
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self.mirror.update({h.name: self._fetch_shadow(h) for h in self.hosted.values()})
        self.mirror.wait_ready(sc.shadow_start_timeout_s)
        if sc.reload_interval_s > 0:
            threading.Thread(target=self._poll, args=(sc.reload_interval_s,), daemon=True, name="alias-poll").start()
        log.info("%s", self.describe())

    def describe(self) -> str:
        lines = []
        for h in self.hosted.values():
            champion = f"{h.registered} {h.champion.describe()}" if h.champion else f"{h.registered}: no @champion"
            shadow = self.mirror.shadow_info(h.name)
            mirroring = (f"mirroring to v{shadow['version']} with a {self.cfg.serving.shadow_timeout_ms:.0f} ms "
                         f"deadline" + ("" if self.mirroring else " (off)")) if shadow else "no @shadow to mirror to"
            lines.append(f"serving {ENDPOINTS[h.role]}: {champion}; {mirroring}; logging to {h.root}")
        return "\n".join(lines)

    def _fetch_shadow(self, h: Hosted) -> tuple | None:
        """The @shadow version's package and log root, or None (logged) when there is none or it cannot be fetched:
        the champion serves either way."""
        try:
            return fetch(self.cfg, h.name, registry.SHADOW, self.workdir), h.root
        except ServingError as exc:
            log.info("%s: nothing to mirror to", exc)
        except Exception as exc:
            log.warning("could not fetch @shadow of %s (%s: %s): not mirroring it", h.registered, type(exc).__name__,
                        exc)
        return None

    # -- the request path -----------------------------------------------------------------------------------------
    def answer(self, req, defer=None) -> dict:
        """The champion's answer to one request (a `requests` body: its type says the role), logged and mirrored.

        `defer(fn)`, when given, takes the logging and the hand-over to the shadow to run after the answer has gone
        out (the HTTP routes pass FastAPI's background tasks): the caller waits for the champion only."""
        role = ROLE_OF[type(req)]
        h = self.by_role.get(role)
        if h is None:
            raise NotHosted(f"this service does not host a {role.replace('_', ' ')} (hosted: "
                            f"{', '.join(self.hosted)}); start it without --model, or with --model for one", 404)
        champion = h.champion  # one model for the whole request, even if a reload swaps it meanwhile
        if champion is None:
            raise NotHosted(f"{h.registered} has no @champion loaded yet; the alias poll loads it once it exists", 503)
        sent = inputs(req)
        self.mirror.hold()  # the shadow process is paused while the champion computes (serving.shadow_yield)
        t0 = time.perf_counter()
        try:
            answer = champion.answer(sent)
        except Exception:
            self.metrics.request_errors.labels(h.registered).inc()
            raise
        finally:
            self.mirror.release()
        ms = (time.perf_counter() - t0) * 1000
        at, mirror = datetime.now(UTC), self.mirroring  # as of the answer, whenever the record is written
        request_id = req.request_id or f"req-{uuid.uuid4().hex}"
        self.metrics.requests.labels(h.registered).inc()
        self.metrics.champion_latency.labels(h.registered).observe(ms / 1000)

        def finish() -> None:
            fields, scrubbed = logged_request(role, req)  # what reaches the log: never the customer's personal data
            record = {"schema_version": SCHEMA_VERSION, **fields, "event": champion.event, "request_id": request_id,
                      "conversation_id": req.conversation_id or f"conv-{uuid.uuid4().hex[:16]}", "turn": req.turn,
                      "timestamp": at, "model": champion.model_field, "runtime": "onnxruntime",
                      **answer_fields(role, answer, fields), "latency_ms": round(ms, 3), "locale": req.locale,
                      "pii_scrubbed": dict(scrubbed) or None,
                      **({"reviewed_label": None} if role == "intent_classifier" else {})}
            self.log_record(h, record)
            if mirror:
                self.mirror.submit(h.name, record, sent)

        if defer is None:
            finish()
        else:
            defer(finish)
        return {"request_id": request_id, **response(role, answer, req), "model": h.registered,
                "version": champion.version, "latency_ms": round(ms, 3)}

    def log_record(self, h: Hosted, record: dict) -> None:
        """Log without failing the caller: a record that cannot be logged is counted, the answer still goes out."""
        try:
            self.writers[h.root].write(record)
        except Exception as exc:
            self.refused += 1
            log.warning("could not log a %s record: %s", record.get("event"), exc)

    # -- aliases --------------------------------------------------------------------------------------------------
    def reload(self) -> dict:
        """Follow the aliases: load the versions @champion and @shadow now point at, then swap them in. A champion
        that fails to load raises (the loaded one keeps serving); a shadow that fails is retried at the next poll."""
        with self._reload_lock:
            client = tracking.configure(self.cfg)
            shadows = {}
            for h in self.hosted.values():
                mv = registry.alias_version(client, h.registered, registry.CHAMPION)
                if mv is None:
                    if h.champion is not None:
                        log.warning("%s has no @champion any more; still serving %s", h.registered,
                                    h.champion.describe())
                elif h.champion is None or str(mv.version) != h.champion.version:
                    loaded = ServedModel.load(self.cfg, h.name, registry.CHAMPION, self.workdir)
                    log.info("@champion moved: now serving %s %s (was %s)", h.registered, loaded.describe(),
                             f"v{h.champion.version}" if h.champion else "none")
                    h.champion = loaded
                mv = registry.alias_version(client, h.registered, registry.SHADOW)
                wanted = self.mirror.wanted.get(h.name)
                if mv is None:
                    if wanted is not None:
                        log.info("@shadow removed: mirroring to %s v%s stops", h.registered, wanted[0].version)
                    shadows[h.name] = None
                elif wanted is None or wanted[0].version != str(mv.version) or h.name in self.mirror.failed:
                    shadows[h.name] = self._fetch_shadow(h)
            self.mirror.update(shadows)
            self.mirror.wait_ready(self.cfg.serving.shadow_start_timeout_s)
            return self.health()

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.reload()
            except Exception as exc:  # a registry outage must not stop serving
                log.warning("could not check the aliases (%s: %s); serving the versions already loaded",
                            type(exc).__name__, exc)

    # -- health and metrics ---------------------------------------------------------------------------------------
    def _model_health(self, h: Hosted) -> dict:
        wanted = self.mirror.wanted.get(h.name)
        c = h.champion
        return {"registered": h.registered, "role": h.role, "endpoint": ENDPOINTS[h.role],
                "champion": c.version if c else None, "champion_precision": c.precision if c else None,
                "shadow": wanted[0].version if wanted else None,
                "shadow_precision": wanted[0].meta.get("precision", "fp32") if wanted else None,
                "mirroring": self.mirroring and self.mirror.shadow_info(h.name) is not None,
                "shadow_state": self.mirror.state(h.name, self.mirroring)}

    def health(self) -> dict:
        models = {name: self._model_health(h) for name, h in self.hosted.items()}
        process = self.mirror.health()
        return {"status": "ok" if all(m["champion"] for m in models.values()) else "degraded",
                "mirroring": self.mirroring, "mirror_queue": process["queue"], "shadow_process": process,
                "models": models}

    def _log_figures(self) -> dict:
        figures = Counter()
        for writer in self.writers.values():
            figures.update(writer.health())
        return {"records": figures["records"], "errors": figures["dropped"] + self.refused,
                "flush_errors": figures["flush_errors"], "pending": figures["pending"]}

    def _scrape(self) -> dict:
        process = self.mirror.health()
        return {"log": {"service": self._log_figures(), "shadow": self.mirror.log_figures()},
                "models": [self._model_health(h) for h in self.hosted.values()], "queue": process["queue"],
                "worker_up": int(process["up"])}

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    def close(self) -> None:
        self._stop.set()
        try:
            self.mirror.close()  # the shadow process writes the records it holds
            for writer in self.writers.values():
                writer.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)  # sessions are in memory; the downloads are not needed
        figures = self._log_figures()
        log.info("stopped; %d log records written", figures["records"])

"""The service's Prometheus metrics (prometheus-client), in a registry of the service's own, so two services in
one process (tests) never share a series.

Only types Prometheus aggregates across replicas: counters and histograms (per model, labelled with the registered
name), plus gauges for what is true now (queue length, records waiting, mirroring on, the shadow process up).
Agreement is a counter of agreeing answers: rate(qat_shadow_agreements_total) / rate(qat_shadow_answered_total).
Log figures are counted by the process that writes them (`process`: service, shadow).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Encoder inference at batch 1 is milliseconds; the tail goes to the shadow's deadline and beyond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.25, 0.5, 1.0, 2.5)
DROP_REASONS = ("queue_full", "stalled", "worker_lost", "worker_down", "not_loaded")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """Counters and histograms the request path and the shadow's reports update; gauges and log figures are read
    from the service when Prometheus scrapes (`state` returns them)."""

    def __init__(self, state=None):
        r = self.registry = CollectorRegistry()
        per_model = ["model"]
        self.requests = Counter("qat_requests", "Requests answered by the champion.", per_model, registry=r)
        self.request_errors = Counter("qat_request_errors", "Requests the champion failed to answer (HTTP 500).",
                                      per_model, registry=r)
        self.champion_latency = Histogram("qat_champion_latency_seconds", "Champion inference time per request.",
                                          per_model, buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_latency = Histogram("qat_shadow_latency_seconds",
                                        "Shadow inference time per mirrored request answered within the deadline.",
                                        per_model, buckets=LATENCY_BUCKETS, registry=r)
        self.mirrored = Counter("qat_shadow_mirrored", "Requests handed to the shadow.", per_model, registry=r)
        self.answered = Counter("qat_shadow_answered", "Shadow answers within the deadline.", per_model, registry=r)
        self.errors = Counter("qat_shadow_errors", "Shadow calls that raised.", per_model, registry=r)
        self.timeouts = Counter("qat_shadow_timeouts", "Shadow calls past the deadline (late or hung).", per_model,
                                registry=r)
        self.dropped = Counter("qat_shadow_dropped", "Mirrors dropped: queue_full, stalled (every shadow thread hung), "
                               "worker_lost (in the shadow process when it died), worker_down (while it restarts), "
                               "not_loaded.", ["model", "reason"], registry=r)
        self.agreements = Counter("qat_shadow_agreements", "Shadow answers equal to the champion's (the intent, the "
                                  "escalate decision, the top passage).", per_model, registry=r)
        self.restarts = Counter("qat_shadow_worker_restarts", "Shadow processes restarted (exited: it died; "
                                "unresponsive: no heartbeat, killed).", ["reason"], registry=r)
        if state is not None:
            r.register(_StateCollector(state))

    def outcome(self, model: str, outcome: str, ms: float, agreed: bool) -> None:
        """One mirrored request's outcome as the shadow process reported it."""
        if outcome == "answered":
            self.answered.labels(model).inc()
            self.shadow_latency.labels(model).observe(ms / 1000)
            if agreed:
                self.agreements.labels(model).inc()
        elif outcome == "error":
            self.errors.labels(model).inc()
        elif outcome == "timeout":
            self.timeouts.labels(model).inc()
        else:
            self.dropped.labels(model, outcome.removeprefix("dropped:")).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def totals(self) -> dict[str, float]:
        """Each counter summed over its labels (`{name}` without `_total`): for logs, tests and the health page."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            if family.type != "counter":
                continue
            out[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        return out


class _StateCollector:
    """What is read from the service at scrape time: gauges, and the log writers' cumulative counts."""

    def __init__(self, state):
        self.state = state

    def describe(self):
        return []

    def collect(self):
        s = self.state()
        log_figures = s["log"]
        for name, key, text in (("qat_log_records", "records", "Traffic records written to the log."),
                                ("qat_log_errors", "errors", "Records that could not be logged (refused, or dropped "
                                                             "while storage was down)."),
                                ("qat_log_flush_errors", "flush_errors",
                                 "Log flushes that failed (records kept, retried).")):
            family = CounterMetricFamily(name, text, labels=["process"])
            for process, figures in log_figures.items():
                family.add_metric([process], figures[key])
            yield family
        pending = GaugeMetricFamily("qat_log_pending_records", "Records buffered, not yet written.", labels=["process"])
        for process, figures in log_figures.items():
            pending.add_metric([process], figures["pending"])
        yield pending
        mirroring = GaugeMetricFamily("qat_mirroring_enabled", "Whether requests are mirrored to the shadow now.",
                                      labels=["model"])
        info = GaugeMetricFamily("qat_model_info", "The versions served: 1 per model, champion and shadow.",
                                 labels=["model", "role", "champion", "shadow"])
        for m in s["models"]:
            mirroring.add_metric([m["registered"]], int(m["mirroring"]))
            info.add_metric([m["registered"], m["role"], m["champion"] or "", m["shadow"] or ""], 1)
        yield mirroring
        yield info
        yield GaugeMetricFamily("qat_shadow_queue_length", "Mirrors waiting for the shadow process.",
                                value=s["queue"])
        yield GaugeMetricFamily("qat_shadow_worker_up", "Whether the shadow process is running.", value=s["worker_up"])

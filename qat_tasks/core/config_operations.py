"""The sections of a pipeline profile that decide how candidates are judged and how the pipeline runs: evaluation,
promotion gates, retries, scheduling, the memory budget, serving, shadow review and the drift monitor. Like
`config_sections`, each forbids unknown keys; a profile that leaves one out gets the defaults below."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from qat_tasks.core.config_sections import Fraction, Strict


class EvaluationConfig(Strict):
    threads: int = Field(default=1, ge=1)  # the serving session's threads: latency is measured as it serves
    # Threads of the session that scores whole splits (quality only; the same graph, so the same logits): 0 = all.
    bulk_threads: int = Field(default=0, ge=0)
    latency_samples: int = Field(default=200, ge=10)
    # The latency gate times champion and candidate interleaved in this many rounds (latency_samples in all,
    # per model), in one process, and resamples whole rounds for the P95 ratio's interval.
    latency_rounds: int = Field(default=20, ge=2)
    warmup: int = Field(default=10, ge=0)
    throughput_batch: int = Field(default=32, ge=1)
    ece_bins: int = Field(default=15, ge=2)


class EncoderGates(Strict):
    max_accuracy_drop_pts: float = 0.3
    max_rare_class_accuracy_drop_pts: float = 0.6
    max_escalation_recall_drop_pts: float = 0.5
    max_ece_increase: float = 0.01
    max_p95_ratio: float = Field(default=2 / 3, gt=0)


class RerankerGates(Strict):
    max_ndcg10_drop: float = 0.01
    max_mrr10_drop: float = 0.01
    max_p95_ratio: float = Field(default=0.7, gt=0)


class EscalationGates(Strict):
    # A missed frustrated customer costs more than a false alarm: recall (at each model's own tuned
    # threshold) may drop at most a point; precision may give a little more. The tolerance is a
    # non-inferiority margin: at 0 only a candidate proven better (or answering every frustrated row alike) passes.
    max_recall_drop_pts: float = Field(default=1.0, ge=0)
    max_precision_drop_pts: float = Field(default=3.0, ge=0)
    max_ece_increase: float = 0.01
    max_p95_ratio: float = Field(default=2 / 3, gt=0)


class LlmGates(Strict):
    max_perplexity_increase_rel: float = 0.05
    max_routing_accuracy_drop_pts: float = 2.0
    # The memory the 4-bit model may take: stored bits per decoder-layer weight (scales and zero points included),
    # read off the candidate's checkpoint. None: no limit.
    max_average_bits: float | None = Field(default=None, gt=1)


class GatesConfig(Strict):
    """Promotion gates. Each quality gate is a paired test of non-inferiority on the evaluation rows: it passes when
    the upper end of the loss's `confidence` interval is within the tolerance, fails when the lower end is past
    it, and otherwise reports insufficient evidence, which `on_insufficient_evidence` then blocks (production) or
    lets the point estimate decide (`point_rule`: exploratory runs; recorded on the decision)."""

    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    bootstrap_resamples: int = Field(default=2000, ge=200, le=100_000)
    on_insufficient_evidence: Literal["block", "point_rule"] = "block"
    intent_classifier: EncoderGates = EncoderGates()
    escalation_detector: EscalationGates = EscalationGates()
    reranker: RerankerGates = RerankerGates()
    llm: LlmGates = LlmGates()


class RetriesConfig(Strict):
    """Transient S3 and MLflow-server errors: tries per request and exponential backoff (qat_tasks.core.resilience)."""

    attempts: int = Field(default=5, ge=1, le=20)
    backoff_s: int = Field(default=1, ge=0, le=60)  # first wait, doubling; whole seconds (MLflow's client)
    max_backoff_s: float = Field(default=30.0, gt=0, le=600)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)  # one HTTP request's connect / read timeout


class SchedulingConfig(Strict):
    """Where the LLM's tasks run: production sends them to Celery queue `gpu` and a one-slot pool, so one
    quantization holds the GPU at a time (create it: airflow pools set llm_gpu 1 "4-bit LLM quantization")."""

    llm_queue: str = "default"
    llm_pool: str = "default_pool"
    # Airflow's retries of a failed task, with exponential delay from retry_delay_s up to max_retry_delay_s.
    task_retries: int = Field(default=2, ge=0, le=10)
    retry_delay_s: float = Field(default=60.0, ge=0)
    max_retry_delay_s: float = Field(default=900.0, ge=0)
    # Each heavy stage (champion, evaluation, INT8 and 4-bit tracks, shadow) in a spawned process of its own, so
    # the worker gets its memory back when it ends. On by default; a test may turn it off to share one process.
    isolate_stages: bool = True
    # A measurement whose inputs (registered version, calibration rows, settings, library versions) are those of an
    # earlier DAG run is taken from that run instead of made again: a rerun costs only what changed.
    reuse_unchanged: bool = True
    # Every task is killed (and retried) past its execution timeout: `task_timeout_minutes` for each task unless
    # `task_timeouts_minutes` names it (the LLM's quantization takes hours on a GPU).
    task_timeout_minutes: float = Field(default=120.0, gt=0)
    task_timeouts_minutes: dict[str, float] = {"llm_4bit_challenger": 480.0}
    # A quarterly run still going this long after it was queued is overdue: a deadline alert tells people.
    expected_run_minutes: float = Field(default=720.0, gt=0)

    @field_validator("task_timeouts_minutes")
    @classmethod
    def _positive_timeouts(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if not t > 0}
        if bad:
            raise ValueError(f"timeouts must be positive minutes: {bad}")
        return v

    def task_timeout(self, task_id: str):
        from datetime import timedelta

        return timedelta(minutes=self.task_timeouts_minutes.get(task_id, self.task_timeout_minutes))

    def task_defaults(self) -> dict:
        """The DAGs' default_args: every task retried with exponential backoff and killed past its timeout."""
        from datetime import timedelta

        return {"owner": "mlops", "retries": self.task_retries, "retry_delay": timedelta(seconds=self.retry_delay_s),
                "retry_exponential_backoff": True, "max_retry_delay": timedelta(seconds=self.max_retry_delay_s),
                "execution_timeout": timedelta(minutes=self.task_timeout_minutes)}


NotificationEvent = Literal["task_failed", "run_failed", "run_overdue", "drift_triggered", "promoted", "rolled_back"]


class NotificationsConfig(Strict):
    """Who is told what (qat_tasks.reporting.notifications). Addresses and endpoints live in Airflow connections,
    never here: `smtp_conn_id` an SMTP connection (Airflow's SmtpNotifier), `webhook_conn_id` an HTTP connection
    whose URL takes a JSON {"text": ...} POST (a Slack incoming webhook; the URL is the secret)."""

    smtp_conn_id: str | None = None
    email_to: tuple[str, ...] = ()
    email_from: str = "mangaassist-mlops@localhost"
    webhook_conn_id: str | None = None
    events: tuple[NotificationEvent, ...] = ("task_failed", "run_failed", "run_overdue", "drift_triggered",
                                             "promoted", "rolled_back")

    @model_validator(mode="after")
    def _addressed(self) -> NotificationsConfig:
        if self.smtp_conn_id and not self.email_to:
            raise ValueError("notifications.email_to: smtp_conn_id is set, so say who receives the e-mail")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.smtp_conn_id or self.webhook_conn_id)


class BudgetConfig(Strict):
    """What the main job may cost on the machine it runs on: `scripts/check_budget.py` fails a run that went over.
    A first run bootstraps the FP32 champions; a rerun finds them registered and has the tighter budget."""

    wall_minutes: float = Field(default=15.0, gt=0)
    rerun_wall_minutes: float = Field(default=10.0, gt=0)
    peak_memory_gb: float = Field(default=4.0, gt=0)  # the worker and the stage process it runs, together


class GpuInstance(Strict):
    name: str
    gpu: str
    gpus: int = Field(default=1, ge=1)
    gpu_memory_gib: float = Field(gt=0)  # per GPU
    usd_per_hour: float = Field(gt=0)


class MemoryBudgetConfig(Strict):
    """Do all five models fit one GPU? Sizes come from the real artifacts (demo) or parameter counts (production)."""

    gpu_memory_gib: float = Field(default=24.0, gt=0)
    runtime_overhead_gib: float = Field(default=1.5, ge=0)  # CUDA context, activations, allocator slack
    kv_concurrent_sequences: int = Field(default=16, ge=1)
    kv_context_tokens: int = Field(default=4096, ge=1)
    # The production LLM whose sizes are computed from its parameter count and chosen format.
    production_llm: Literal["llama-3-8b"] = "llama-3-8b"
    # us-east-1 on-demand list prices, to be checked before quoting: data, never measured here.
    instances: tuple[GpuInstance, ...] = (
        GpuInstance(name="g6.xlarge", gpu="L4", gpu_memory_gib=24, usd_per_hour=0.805),
        GpuInstance(name="g5.xlarge", gpu="A10G", gpu_memory_gib=24, usd_per_hour=1.006),
        GpuInstance(name="g6e.xlarge", gpu="L40S", gpu_memory_gib=48, usd_per_hour=1.861),
        GpuInstance(name="g5.12xlarge", gpu="A10G", gpus=4, gpu_memory_gib=24, usd_per_hour=5.672),
    )


class ServingConfig(Strict):
    """The HTTP service (qat_tasks.serving): answers every request with each encoder's @champion and mirrors it to
    its @shadow in a process of its own; the shadow never delays, changes or fails the champion's answer."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    threads: int = Field(default=1, ge=1)  # ONNX Runtime intra-op threads per model session
    shadow_timeout_ms: float = Field(default=250.0, gt=0)  # a shadow answer later than this counts as a timeout
    shadow_queue_size: int = Field(default=1000, ge=1)  # mirrors waiting past this are dropped (and counted)
    shadow_workers: int = Field(default=1, ge=1)  # threads answering mirrors in the shadow process
    shadow_nice: int = Field(default=10, ge=0, le=19)  # the shadow process yields the CPU to the champion's
    # Pause the shadow process while the service answers a request, so its compute never runs beside the
    # champion's on shared cores; its deadlines leave the pauses out. On a saturated service it runs in the gaps
    # only, and its mirrors queue, then drop (counted). false: let it run beside (cores of its own).
    shadow_yield: bool = True
    # How long the service waits at start (and at an alias reload) for the shadow process to load @shadow before
    # it serves without mirroring; mirroring starts whenever the load completes.
    shadow_start_timeout_s: float = Field(default=120.0, gt=0)
    reload_interval_s: float = Field(default=30.0, ge=0)  # alias polling: a promotion is served without restart
    # Where the service writes its records (traffic schema): None is traffic.source, so its logs are the next
    # quarter's calibration source. Each flush is one new immutable file in the day's dt= partition.
    log_dir: str | None = None
    log_flush_records: int = Field(default=500, ge=1)
    log_flush_seconds: float = Field(default=10.0, gt=0)


class ShadowConfig(Strict):
    """Shadow deployment and review (qat_tasks.promotion.shadow): a @challenger that passed the offline gates gets
    @shadow; a review on mirrored traffic decides whether it becomes @champion. Every served encoder is reviewed;
    the quality gates on reviewed labels apply to the intent classifier (review labels are intents)."""

    # replay: the quarterly run replays logged traffic through champion and shadow and reviews at once;
    # live: the shadow waits for `live_window_hours` of mirrored traffic, reviewed by the shadow_review DAG.
    review: Literal["replay", "live"] = "replay"
    live_window_hours: float = Field(default=24.0, gt=0)
    replay_max_requests: int = Field(default=2000, ge=1)
    # Evidence the review needs before it decides anything: too little keeps the shadow running.
    min_mirrored_requests: int = Field(default=200, ge=1)
    min_reviewed_labels: int = Field(default=100, ge=0)
    # Gates on mirrored traffic (the quality gates on reviewed labels are gates.intent_classifier's).
    # Agreement: the same intent, the same escalate decision, the same top passage (reranker).
    min_agreement: Fraction = 0.95
    min_overlap_at_k: Fraction = 0.9  # reranker: share of the champion's top k passages in the shadow's top k
    max_shadow_error_rate: Fraction = 0.01  # errors + timeouts + dropped mirrors per mirrored request
    max_p95_ratio: float = Field(default=1.0, gt=0)  # shadow P95 / champion P95 on the same requests
    # auto: a passing review promotes at once; manual: it waits for a person (the shadow_review DAG's approval
    # task in the Airflow UI, or `qat-tasks promote`).
    promotion: Literal["auto", "manual"] = "auto"
    approval_timeout_hours: float = Field(default=72.0, gt=0)  # unanswered this long: rejected, nothing promoted


DriftFeature = Literal["activations", "inputs", "predictions"]


class DriftConfig(Strict):
    """The daily drift monitor (qat_tasks.monitoring.drift): activation and input statistics of recent traffic against
    those stored at calibration time; past the threshold it triggers the recalibration DAG with a reason."""

    # None: every intent classifier and escalation detector in the config (the models that read the user's text).
    models: tuple[str, ...] | None = None
    window_days: int = Field(default=1, ge=1, le=92)
    max_rows: int = Field(default=2000, ge=10)  # recent requests sampled (seeded) from the window
    min_rows: int = Field(default=200, ge=10)  # fewer: no verdict, the monitor says so
    reference_rows: int = Field(default=1000, ge=10)  # calibration rows the stored statistics come from
    bins: int = Field(default=10, ge=2, le=100)  # PSI bins: quantiles of the reference
    psi_threshold: float = Field(default=0.25, gt=0)  # 0.1 moderate, 0.25 significant shift (the usual reading)
    ks_threshold: float = Field(default=0.2, gt=0, le=1)
    features: tuple[DriftFeature, ...] = ("activations", "inputs", "predictions")
    trigger: bool = True  # False: report only

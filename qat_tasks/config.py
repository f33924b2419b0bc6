"""Typed pipeline configuration: `configs/*.yaml` -> pydantic models that reject unknown keys and wrong types.

Relative paths in a config file resolve against the project root (the folder that holds `configs/`; set
QAT_PROJECT_ROOT when the package is installed elsewhere), so the same file works from the CLI, from
Airflow workers and from tests, whatever their working directory.
"""

from __future__ import annotations

import difflib
import os
from datetime import date
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qat_tasks.schema import INTENTS

PROJECT_ROOT = Path(os.environ.get("QAT_PROJECT_ROOT") or Path(__file__).resolve().parent.parent)
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"

Role = Literal["intent_classifier", "escalation_detector", "reranker", "llm"]
Method = Literal["fp32", "qat_int8", "ptq_dynamic_int8", "ptq_static_int8", "qat_distill_int8", "awq_w4a16", "gptq_w4a16", "rtn_w4a16"]
Runtime = Literal["onnxruntime", "pytorch", "transformers", "vllm"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ConfigError(ValueError):
    """A configuration file that does not fit the schema; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TrackingConfig(Strict):
    # None: $MLFLOW_TRACKING_URI, else the embedded SQLite store under state_dir.
    uri: str | None = None
    experiment_prefix: str = "mangaassist"


class WindowConfig(Strict):
    # Unquoted YAML dates arrive as dates, quoted ones as ISO strings: accept both, nothing else.
    start: date = Field(strict=False)
    end: date = Field(strict=False)  # exclusive

    @model_validator(mode="after")
    def _ordered(self) -> WindowConfig:
        if self.end <= self.start:
            raise ValueError(f"window end {self.end} must be after start {self.start}")
        return self


class TrafficConfig(Strict):
    source: str = Field(description="local folder or s3://bucket/prefix of date-partitioned JSONL logs")
    # None: the calendar quarter before the DAG run's logical date.
    window: WindowConfig | None = None
    max_invalid_fraction: Fraction = 0.02
    s3_endpoint_url: str | None = None


class SplitSizes(Strict):
    calibration: int = Field(gt=0)
    qat_train: int = Field(gt=0)
    evaluation: int = Field(gt=0)


class SplitFractions(Strict):
    """Share of conversations assigned to each split (by a seeded hash of the conversation id)."""

    calibration: Fraction = 0.15
    qat_train: Fraction = 0.55
    evaluation: Fraction = 0.30

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.calibration + self.qat_train + self.evaluation
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.4f}")
        return self


class EdgeCaseConfig(Strict):
    low_confidence_below: Fraction = 0.55
    long_text_chars: int = Field(default=180, gt=0)
    non_english: bool = True
    # Share of each split's per-intent quota reserved for edge cases when they exist.
    reserve_fraction: Fraction = 0.15


class CalibrationConfig(Strict):
    seed: int = 2026
    output: str | None = None  # None: <state_dir>/calibration; or s3://bucket/prefix
    sizes: SplitSizes
    llm_conversations: int = Field(default=128, gt=0)
    split_fractions: SplitFractions = SplitFractions()
    min_per_intent: int = Field(default=20, ge=1)
    on_missing_intent: Literal["fail", "warn"] = "fail"
    on_underrepresented_intent: Literal["fail", "warn"] = "warn"
    rare_intents: tuple[str, ...] = ("escalation", "checkout_help")
    edge_cases: EdgeCaseConfig = EdgeCaseConfig()

    @field_validator("rare_intents")
    @classmethod
    def _known_intents(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [i for i in v if i not in INTENTS]
        if unknown:
            raise ValueError(f"unknown intent(s) {unknown}; known: {list(INTENTS)}")
        return v


class TrainingConfig(Strict):
    epochs: int = Field(default=2, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=64, ge=8)
    warmup_fraction: Fraction = 0.1
    weight_decay: float = Field(default=0.01, ge=0)
    class_weighted_loss: bool = True
    seed: int = 13


Candidate = Literal["ptq_dynamic", "ptq_static_minmax", "ptq_static_percentile", "ptq_static_entropy",
                    "ptq_static_smoothquant", "qat_static", "qat_dynamic", "qat_distill_static", "qat_distill_dynamic"]


class QuantizationConfig(Strict):
    """Which INT8 candidates to build for an encoder, and how."""

    # None: chosen by the seeds' rule (qat_tasks.challenger.choose_candidates); a list overrides it.
    candidates: tuple[Candidate, ...] | None = None
    # Share of human-reviewed labels in the training split for the rule to count it as labelled.
    min_reviewed_fraction: Fraction = 0.3
    percentile: float = Field(default=99.999, gt=90, le=100)
    smoothquant_alpha: Fraction = 0.5
    calibration_batch_size: int = Field(default=16, ge=1)
    # Operator-mismatch check: top-1 agreement with the PyTorch model the candidate came from.
    parity_min_agreement: Fraction = 0.97
    parity_samples: int = Field(default=256, ge=8)
    # QAT: one short epoch at a tenth of the fine-tuning learning rate, observers frozen for the last 30 %.
    qat_epochs: int = Field(default=1, ge=1)
    qat_lr_fraction: float = Field(default=0.1, gt=0, le=1)
    focal_gamma: float = Field(default=2.0, ge=0)
    freeze_observers_fraction: Fraction = 0.3
    distill_alpha: Fraction = 0.5
    distill_temperature: float = Field(default=2.0, gt=0)
    # Activation ranges of qat_static: calibrated by min-max on the QAT weights, or the ranges QAT trained with.
    # On the demo champion "qat" measured 98.67 % accuracy against 99.00 % for "calibrated".
    qat_static_ranges: Literal["calibrated", "qat"] = "calibrated"
    # When no candidate passes: per-layer sensitivity, then keep up to this many units in FP32.
    mixed_precision: bool = True
    max_fp32_units: int = Field(default=3, ge=1)


class SplitCaps(Strict):
    """At most this many rows (escalation detector) or query groups (reranker) per split; None: all there are."""

    calibration: int | None = Field(default=None, gt=0)
    qat_train: int | None = Field(default=None, gt=0)
    evaluation: int | None = Field(default=None, gt=0)


ESCALATION_DATA_KEYS = frozenset({"frustrated_max_rating", "calm_min_rating", "target_recall"})
RERANKER_DATA_KEYS = frozenset({"candidates_per_query", "train_negatives", "product_query_share"})


class RoleDataConfig(Strict):
    """Rows an encoder is trained and judged on beyond the refreshed traffic (qat_tasks.role_data)."""

    # Public labelled data: None takes the role's default, the human-rated sentences inside the
    # vadersentiment==3.3.2 source archive (escalation detector) or chitchat-dataset conversations (reranker).
    # Forms: pypi-sdist://name==version/member/in/archive, pkg://package/file, a local path, s3://bucket/key.
    public_source: str | None = None
    max_rows: SplitCaps = SplitCaps()
    # Escalation detector. Sentences are rated from -4 (very negative) to +4 by ten people; the mean at or
    # below frustrated_max_rating counts as a frustrated customer, at or above calm_min_rating as calm, and the
    # ambiguous band in between is left out (and counted).
    frustrated_max_rating: float = Field(default=-1.0, ge=-4, le=4)
    calm_min_rating: float = Field(default=0.0, ge=-4, le=4)
    # The decision threshold is tuned on held-out rows for at least this recall of frustrated customers.
    target_recall: Fraction = 0.95
    # Reranker: each query ranks its true passage among candidates_per_query - 1 sampled others; training pairs
    # take train_negatives of them per query; product_query_share of the groups are MangaAssist product queries.
    candidates_per_query: int = Field(default=20, ge=2, le=200)
    train_negatives: int = Field(default=3, ge=1)
    product_query_share: Fraction = 0.5

    @model_validator(mode="after")
    def _bands(self) -> RoleDataConfig:
        if self.frustrated_max_rating >= self.calm_min_rating:
            raise ValueError(f"frustrated_max_rating ({self.frustrated_max_rating}) must be below calm_min_rating "
                             f"({self.calm_min_rating})")
        if self.train_negatives >= self.candidates_per_query:
            raise ValueError(f"train_negatives ({self.train_negatives}) must be below candidates_per_query "
                             f"({self.candidates_per_query})")
        return self


LlmMethod = Literal["rtn", "awq", "gptq"]


class LlmCandidate(Strict):
    """One 4-bit candidate: a method, the text it calibrates on, and blocks kept at 16-bit (mixed precision)."""

    method: LlmMethod
    # domain: the refreshed MangaAssist conversations; generic: gensim's Wikipedia/news text (the comparison);
    # none: round-to-nearest needs no data.
    calibration: Literal["domain", "generic", "none"] = "domain"
    # Decoder blocks kept unquantized, by index (negative counts from the end: -1 is the last block).
    keep_blocks: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _calibration_fits(self) -> LlmCandidate:
        if self.method == "rtn" and self.calibration != "none":
            raise ValueError(f"calibration {self.calibration!r}: rtn (round-to-nearest) takes no calibration data; "
                             f"write calibration: none")
        if self.method != "rtn" and self.calibration == "none":
            raise ValueError(f"calibration 'none': {self.method} needs calibration text (domain or generic)")
        return self

    @property
    def key(self) -> str:
        """A stable short name: awq-domain, gptq-generic, awq-domain-keep0_-1, rtn."""
        name = self.method if self.method == "rtn" else f"{self.method}-{self.calibration}"
        return name + (f"-keep{'_'.join(str(b) for b in self.keep_blocks)}" if self.keep_blocks else "")


class LlmTrackConfig(Strict):
    """The 4-bit track of the fallback LLM (qat_tasks.llm_track): W4A16 candidates, judged against the
    unquantized model on perplexity and intent routing."""

    candidates: tuple[LlmCandidate, ...] = (LlmCandidate(method="rtn", calibration="none"),
                                            LlmCandidate(method="awq"), LlmCandidate(method="gptq"))
    bits: Literal[4, 8] = 4
    # Group size 128 as in the AWQ/GPTQ papers; a layer whose input width it does not divide falls back to 64,
    # then 32 (vLLM's kernels take those), and the fallback is reported per layer.
    group_size: Literal[32, 64, 128] = 128
    awq_symmetric: bool = False  # AWQ with zero point
    gptq_symmetric: bool = True
    gptq_actorder: Literal["static", "weight"] | None = "static"  # "group" (g_idx) is gone from compressed-tensors 0.19
    gptq_dampening: float = Field(default=0.01, gt=0, lt=1)
    rtn_symmetric: bool = False
    awq_n_grid: int = Field(default=20, ge=4, le=100)  # duo scaling halves it: at least 2 points each
    # Calibration: this many samples of at most max_seq_len tokens (conversations come from the calibration
    # version, count set by calibration.llm_conversations).
    calibration_samples: int = Field(default=128, ge=1)
    max_seq_len: int = Field(default=512, ge=16)
    keep_lm_head: bool = True
    chunk_layers: int = Field(default=8, ge=1)  # decoder blocks per resumable checkpoint
    # Evaluation, identical windows and tokenization for every candidate.
    eval_window: int = Field(default=512, ge=16)
    eval_generic_tokens: int = Field(default=20480, ge=16)
    eval_domain_tokens: int = Field(default=20480, ge=16)
    routing_rows: int = Field(default=400, ge=10)
    generation_prompts: tuple[str, ...] = (
        "Is volume 3 of Chainsaw Man back in stock?",
        "My order hasn't arrived after two weeks and nobody answers my emails.",
        "Can you recommend a manga like Frieren for someone new to the genre?",
    )
    max_new_tokens: int = Field(default=48, ge=1)
    # Per-block sensitivity: each block alone quantized (RTN at the track's group size), perplexity on this
    # many generic tokens.
    sensitivity: bool = True
    sensitivity_tokens: int = Field(default=4096, ge=16)

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, v: tuple[LlmCandidate, ...]) -> tuple[LlmCandidate, ...]:
        keys = [c.key for c in v]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"duplicate candidates {dupes}")
        if not v:
            raise ValueError("at least one candidate is required")
        return v


class ModelConfig(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")
    role: Role
    # Local path, s3://bucket/prefix, hf://org/name (or org/name), pkg://python_package/subdir,
    # or tiny-random://bert (a tiny random-initialised encoder for tests).
    source: str
    method: Method
    runtime: Runtime
    training: TrainingConfig = TrainingConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    data: RoleDataConfig = RoleDataConfig()
    llm: LlmTrackConfig | None = None  # the LLM's 4-bit track; None on an LLM: the defaults

    @model_validator(mode="after")
    def _llm_settings_fit_role(self) -> ModelConfig:
        if self.llm is not None and self.role != "llm":
            raise ValueError(f"llm: model {self.name} is a {self.role}; the 4-bit track settings apply to role 'llm'")
        return self

    @property
    def llm_track(self) -> LlmTrackConfig:
        return self.llm or LlmTrackConfig()

    @model_validator(mode="after")
    def _data_keys_fit_role(self) -> ModelConfig:
        """A reranker setting on the escalation detector is a mistake, not a no-op: name it. (Defaults written
        out, as a dumped config has them, are not settings.)"""
        changed = {k for k in self.data.model_fields_set
                   if getattr(self.data, k) != RoleDataConfig.model_fields[k].get_default(call_default_factory=True)}
        wrong = {"escalation_detector": RERANKER_DATA_KEYS, "reranker": ESCALATION_DATA_KEYS}.get(
            self.role, ESCALATION_DATA_KEYS | RERANKER_DATA_KEYS)
        misplaced = sorted(changed & wrong)
        if misplaced:
            raise ValueError(f"data.{misplaced[0]} does not apply to role {self.role!r} (model {self.name})")
        if self.role not in ("escalation_detector", "reranker") and changed:
            raise ValueError(f"data.{sorted(changed)[0]}: model {self.name} ({self.role}) takes no extra data; "
                             f"the intent classifier learns from the refreshed traffic alone")
        return self


class EvaluationConfig(Strict):
    threads: int = Field(default=1, ge=1)
    latency_samples: int = Field(default=200, ge=10)
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
    # threshold) must not drop; precision may give a little.
    max_recall_drop_pts: float = Field(default=0.0, ge=0)
    max_precision_drop_pts: float = Field(default=3.0, ge=0)
    max_ece_increase: float = 0.01
    max_p95_ratio: float = Field(default=2 / 3, gt=0)


class LlmGates(Strict):
    max_perplexity_increase_rel: float = 0.05
    max_routing_accuracy_drop_pts: float = 2.0


class GatesConfig(Strict):
    intent_classifier: EncoderGates = EncoderGates()
    escalation_detector: EscalationGates = EscalationGates()
    reranker: RerankerGates = RerankerGates()
    llm: LlmGates = LlmGates()


class RetriesConfig(Strict):
    """Transient S3 and MLflow-server errors: tries per request and exponential backoff (qat_tasks.resilience)."""

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

    def task_defaults(self) -> dict:
        """The DAGs' default_args: every task retried with exponential backoff."""
        from datetime import timedelta

        return {"owner": "mlops", "retries": self.task_retries, "retry_delay": timedelta(seconds=self.retry_delay_s),
                "retry_exponential_backoff": True, "max_retry_delay": timedelta(seconds=self.max_retry_delay_s)}


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
    """The HTTP service (qat_tasks.serving): answers every request with @champion and mirrors it to @shadow in
    the background; the shadow never delays, changes or fails the champion's answer."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    threads: int = Field(default=1, ge=1)  # ONNX Runtime intra-op threads per model session
    shadow_timeout_ms: float = Field(default=250.0, gt=0)  # a shadow answer later than this counts as a timeout
    shadow_queue_size: int = Field(default=1000, ge=1)  # mirrors waiting past this are dropped (and counted)
    shadow_workers: int = Field(default=1, ge=1)
    shadow_nice: int = Field(default=10, ge=0, le=19)  # the shadow's threads yield the CPU to the champion's
    reload_interval_s: float = Field(default=30.0, ge=0)  # alias polling: a promotion is served without restart
    # Where the service writes its records (traffic schema): None is traffic.source, so its logs are the next
    # quarter's calibration source. Each flush is one new immutable file in the day's dt= partition.
    log_dir: str | None = None
    log_flush_records: int = Field(default=500, ge=1)
    log_flush_seconds: float = Field(default=10.0, gt=0)


class ShadowConfig(Strict):
    """Shadow deployment and review (qat_tasks.shadow): a @challenger that passed the offline gates gets
    @shadow; a review on mirrored traffic decides whether it becomes @champion."""

    # replay: the quarterly run replays logged traffic through champion and shadow and reviews at once;
    # live: the shadow waits for `live_window_hours` of mirrored traffic, reviewed by the shadow_review DAG.
    review: Literal["replay", "live"] = "replay"
    live_window_hours: float = Field(default=24.0, gt=0)
    replay_max_requests: int = Field(default=2000, ge=1)
    # Evidence the review needs before it decides anything: too little keeps the shadow running.
    min_mirrored_requests: int = Field(default=200, ge=1)
    min_reviewed_labels: int = Field(default=100, ge=0)
    # Gates on mirrored traffic (the quality gates on reviewed labels are gates.intent_classifier's).
    min_agreement: Fraction = 0.95
    max_shadow_error_rate: Fraction = 0.01  # errors + timeouts + dropped mirrors per mirrored request
    max_p95_ratio: float = Field(default=1.0, gt=0)  # shadow P95 / champion P95 on the same requests
    # auto: a passing review promotes at once; manual: it waits for `qat-tasks promote`.
    promotion: Literal["auto", "manual"] = "auto"


DriftFeature = Literal["activations", "inputs", "predictions"]


class DriftConfig(Strict):
    """The daily drift monitor (qat_tasks.drift): activation and input statistics of recent traffic against
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


class PipelineConfig(Strict):
    profile: str
    state_dir: str = ".state"
    tracking: TrackingConfig = TrackingConfig()
    traffic: TrafficConfig
    calibration: CalibrationConfig
    models: tuple[ModelConfig, ...]
    evaluation: EvaluationConfig = EvaluationConfig()
    gates: GatesConfig = GatesConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    retries: RetriesConfig = RetriesConfig()
    memory_budget: MemoryBudgetConfig = MemoryBudgetConfig()
    serving: ServingConfig = ServingConfig()
    shadow: ShadowConfig = ShadowConfig()
    drift: DriftConfig = DriftConfig()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        names = [m.name for m in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names {dupes}")
        if not v:
            raise ValueError("at least one model is required")
        return v

    @model_validator(mode="after")
    def _drift_models_known(self) -> PipelineConfig:
        known = {m.name: m.role for m in self.models}
        for name in self.drift.models or ():
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                raise ValueError(f"drift.models: unknown model {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else
                                                                           f"; known: {sorted(known)}"))
            if known[name] not in ("intent_classifier", "escalation_detector"):
                raise ValueError(f"drift.models: {name} is a {known[name]}; the monitor reads the user's text, which "
                                 f"intent classifiers and escalation detectors take")
        return self

    @property
    def drift_models(self) -> list[str]:
        if self.drift.models is not None:
            return list(self.drift.models)
        return [m.name for m in self.models if m.role in ("intent_classifier", "escalation_detector")]

    @property
    def serving_log_dir(self) -> str:
        return self.resolve(self.serving.log_dir) if self.serving.log_dir else self.traffic_source

    # -- resolved locations -------------------------------------------------------------------------
    def resolve(self, path_or_uri: str) -> str:
        if "://" in path_or_uri:
            return path_or_uri
        p = Path(os.path.expandvars(os.path.expanduser(path_or_uri)))
        return str(p if p.is_absolute() else PROJECT_ROOT / p)

    @property
    def state_path(self) -> Path:
        override = os.environ.get("QAT_STATE_DIR")
        return Path(override) if override else Path(self.resolve(self.state_dir))

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.state_path / 'mlflow' / 'mlflow.db'}"

    @property
    def calibration_store(self) -> str:
        return self.resolve(self.calibration.output) if self.calibration.output else str(self.state_path / "calibration")

    @property
    def traffic_source(self) -> str:
        return self.resolve(self.traffic.source)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"no model named {name!r} in profile {self.profile!r}; known: {[m.name for m in self.models]}")


def _describe(err: dict, data: object) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = data
        for part in err["loc"][:-1]:
            parent = parent[part] if isinstance(parent, dict | list) else None
        allowed = []
        # Suggest the nearest allowed key: a typo should cost seconds, not a debugging session.
        model = _model_at(PipelineConfig, err["loc"][:-1], data)
        if model is not None:
            allowed = list(model.model_fields)
        hint = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return f"{loc}: unknown key{suffix}"
    if err["type"] == "missing":
        return f"{loc}: missing (required)"
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


def _model_at(model: type[BaseModel], loc: tuple, data: object) -> type[BaseModel] | None:
    """Walk the schema along an error location to find the model whose keys were wrong."""
    import typing

    current: object = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        ann = current.model_fields[part].annotation
        candidates = [ann, *typing.get_args(ann)]
        for arg in list(candidates):
            candidates.extend(typing.get_args(arg))
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def parse_config(data: object, source: str = "<config>") -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        # YAML dates and lists arrive as Python objects; strict mode still refuses "12" for an int.
        return PipelineConfig.model_validate(_tuples(data))
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e, data) for e in exc.errors())
        raise ConfigError(f"{source}: {len(exc.errors())} problem(s):\n  {problems}") from None


def _tuples(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Load the pipeline config: explicit path, else $QAT_CONFIG, else configs/demo.yaml."""
    path = Path(path or os.environ.get("QAT_CONFIG") or DEFAULT_CONFIG)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))

"""The sections of a pipeline profile, one pydantic model each. Every model forbids unknown keys and is strict about
types (a quoted "12" is not an int), so a typo in a profile is an error naming the key, never a silent default.
Defaults here are what a profile that leaves a section or key out gets; docs/configuration.md lists them all."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qat_tasks.core.schema import INTENTS

Role = Literal["intent_classifier", "escalation_detector", "reranker", "llm"]


Method = Literal["fp32", "qat_int8", "ptq_dynamic_int8", "ptq_static_int8", "qat_distill_int8", "awq_w4a16", "gptq_w4a16", "rtn_w4a16"]


Runtime = Literal["onnxruntime", "pytorch", "transformers", "vllm"]


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


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
    selection: int = Field(gt=0)  # reviewed rows candidates are ranked and searched on
    evaluation: int = Field(gt=0)  # reviewed rows that judge the candidate picked, once


class SplitFractions(Strict):
    """Share of conversations assigned to each split (by a seeded hash of the conversation id); `replay`
    conversations go into no split: the replay review's traffic."""

    calibration: Fraction = 0.15
    qat_train: Fraction = 0.40
    selection: Fraction = 0.15
    evaluation: Fraction = 0.25
    replay: Fraction = 0.05

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.calibration + self.qat_train + self.selection + self.evaluation + self.replay
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
    # Review labels written up to this many days after the window still label its turns (a labelling queue's lag).
    label_lookahead_days: int = Field(default=14, ge=0, le=92)
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
    # Each batch's rows, sorted by length, run through the model in this many slices whose gradients add up to the
    # batch's: the same update with less padding.
    micro_batches: int = Field(default=2, ge=1)
    seed: int = 13


Candidate = Literal["ptq_dynamic", "ptq_static_minmax", "ptq_static_percentile", "ptq_static_entropy",
                    "ptq_static_smoothquant", "qat_static", "qat_dynamic", "qat_distill_static", "qat_distill_dynamic"]


class QuantizationConfig(Strict):
    """Which INT8 candidates to build for an encoder, and how."""

    # None: chosen by the candidate-selection rule (qat_tasks.encoders.int8.track.choose_candidates); a list overrides it.
    candidates: tuple[Candidate, ...] | None = None
    # What the rule builds: "rule" = the baseline every method must beat (ptq_dynamic) plus what the rule picks;
    # "all" = every PTQ calibration too (ptq_static_minmax / percentile / entropy), for a full comparison.
    candidate_set: Literal["rule", "all"] = "rule"
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
    selection: int | None = Field(default=None, gt=0)
    evaluation: int | None = Field(default=None, gt=0)


ESCALATION_DATA_KEYS = frozenset({"frustrated_max_rating", "calm_min_rating", "target_recall"})


RERANKER_DATA_KEYS = frozenset({"candidates_per_query", "train_negatives", "product_query_share"})


class RoleDataConfig(Strict):
    """Rows an encoder is trained and judged on beyond the refreshed traffic (qat_tasks.data.role_splits)."""

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


LlmMethod = Literal["rtn", "awq", "gptq", "autoround"]


class LlmCandidate(Strict):
    """One 4-bit candidate: a method, the text it calibrates on, what is done to the weights first, how their ranges
    are found, and which layers keep more bits (by measurement, under a budget, or whole blocks at 16-bit)."""

    method: LlmMethod
    # domain: the refreshed MangaAssist conversations; generic: gensim's Wikipedia/news text; both: the two sets
    # together (a model that must keep its general language as well as learn the shop's); none: round-to-nearest
    # with min/max ranges needs no data.
    calibration: Literal["domain", "generic", "both", "none"] = "domain"
    # spinquant: R1/R2 random-Hadamard rotations folded into the weights first (qat_tasks.llm.rotation).
    rotation: Literal["none", "spinquant"] = "none"
    # mse: each group's range clipped to the grid point that minimises its rounding error (no data); imatrix: the
    # same search weighted by each input channel's mean square on the calibration text (llm-compressor's
    # importance-weighted observer), which makes calibration text necessary for any method.
    observer: Literal["minmax", "mse", "imatrix"] = "minmax"
    symmetric: bool | None = None  # None: the track's default for the method
    group_size: Literal[32, 64, 128] | None = None  # None: the track's
    # Mixed precision by measurement: the most sensitive layers get `llm.high_bits` while the stored bits per
    # decoder-layer weight (scales and zero points included) stay at most this (qat_tasks.llm.bit_allocation).
    average_bits: float | None = Field(default=None, gt=4, le=16)
    # Decoder blocks kept unquantized, by index (negative counts from the end: -1 is the last block).
    keep_blocks: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _calibration_fits(self) -> LlmCandidate:
        needs_text = self.method != "rtn" or self.observer == "imatrix" or self.average_bits is not None
        if not needs_text and self.calibration != "none":
            raise ValueError(f"calibration {self.calibration!r}: rtn (round-to-nearest) without the imatrix observer "
                             f"takes no calibration data; write calibration: none")
        if needs_text and self.calibration == "none":
            what = self.method if self.method != "rtn" else ("the imatrix observer" if self.observer == "imatrix"
                                                             else "the bit allocator (average_bits)")
            raise ValueError(f"calibration 'none': {what} needs calibration text (domain or generic)")
        return self

    @property
    def key(self) -> str:
        """A stable short name: awq-domain, gptq-generic-spinquant-asym-g64-mixed5.5, awq-domain-keep0_-1, rtn."""
        name = self.method if self.calibration == "none" else f"{self.method}-{self.calibration}"
        if self.rotation != "none":
            name += f"-{self.rotation}"
        if self.observer != "minmax":
            name += f"-{self.observer}"
        if self.symmetric is not None:
            name += "-sym" if self.symmetric else "-asym"
        if self.group_size is not None:
            name += f"-g{self.group_size}"
        if self.average_bits is not None:
            name += f"-mixed{self.average_bits:g}"
        return name + (f"-keep{'_'.join(str(b) for b in self.keep_blocks)}" if self.keep_blocks else "")


class LlmTrackConfig(Strict):
    """The 4-bit track of the fallback LLM (qat_tasks.llm.track): W4A16 candidates, judged against the
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
    autoround_iters: int = Field(default=200, ge=1)  # signed-gradient steps per decoder block
    # The more precise format of mixed-precision candidates: 8-bit weights in groups of this size.
    high_bits: Literal[8] = 8
    high_group_size: Literal[32, 64, 128] = 128
    # What the checkpoint stores its scales, embeddings and LM head in: "source" keeps the model's dtype (Llama 3
    # 8B: bfloat16); a model loaded in fp32 is served at 16 bits, so its checkpoint should be too.
    checkpoint_dtype: Literal["source", "float16", "bfloat16"] = "source"
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



"""The logged-traffic record.

It extends what the serving layer already writes
    {"event": "quantized_inference", "model": ..., "intent": ..., "confidence": ..., "latency_ms": ...,
     "runtime": "onnxruntime"}
with what calibration and evaluation need: ids, a timestamp, the user's text and, where a person
reviewed the turn, the true label. Records that do not fit are quarantined with the reason, never dropped.

Version 3 adds the answers of the escalation detector (`EscalationRecord`) and of the reranker (`RerankRecord`),
each naming its `role`. They are logged in their model's own folder under the service's log root
(`<root>/<model name>/dt=...`), never beside the intent records that calibration reads, and a reader gets them
only when it asks for their role (`parse_line(..., roles=...)`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

# Version 2 adds what the writer scrubbed (`pii_scrubbed`, counts by kind) and the review-label record; version 3
# the escalation detector's and the reranker's records (intent records keep their shape). Readers take every version.
SCHEMA_VERSION = 3
SCHEMA_VERSIONS = (1, 2, 3)
ROLE_RECORDS_SINCE = 3  # the first version with records of roles other than the intent classifier

# The ten MangaAssist intents. escalation and checkout_help are rare in traffic and matter most.
INTENTS: tuple[str, ...] = (
    "product_search",
    "recommendation",
    "order_status",
    "shipping_info",
    "return_request",
    "payment_issue",
    "account_help",
    "chitchat",
    "checkout_help",
    "escalation",
)
Intent = Literal[INTENTS]  # type: ignore[valid-type]  # a tuple subscript spells out each member

# The roles whose answers this schema can log: what the serving component serves and shadows.
SERVED_ROLES: tuple[str, ...] = ("intent_classifier", "escalation_detector", "reranker")
INTENT_ROLE = "intent_classifier"

# Field limits, shared by the log records and the serving component's requests, so every accepted request can be
# logged and every logged record fits.
MAX_TEXT_CHARS = 4000
MAX_ID_CHARS = 128
MAX_TURN = 500
MAX_LOCALE_CHARS = 35  # the longest BCP 47 tags in use
MAX_CANDIDATES = 100  # passages one rerank request may carry


def not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("text is empty")
    return v


RequestId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
ConversationId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Turn = Annotated[int, Field(ge=0, le=MAX_TURN)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(not_blank)]
Locale = Annotated[str, Field(min_length=1, max_length=MAX_LOCALE_CHARS)]


def _aware(v: datetime) -> datetime:
    if v.tzinfo is None:
        raise ValueError("has no timezone (write UTC with a trailing Z)")
    return v


UtcTime = Annotated[datetime, AfterValidator(_aware)]
Event = Literal["quantized_inference", "inference", "shadow_inference"]
Runtime = Literal["onnxruntime", "pytorch", "transformers", "vllm"]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
LatencyMs = Annotated[float, Field(ge=0.0)]
ModelField = Annotated[str, Field(min_length=1)]
# What the writer scrubbed from the logged texts before logging them: counts by kind ([EMAIL], [PHONE], ...), never
# the values.
PiiCounts = dict[Annotated[str, Field(pattern=r"^[A-Z]{2,10}$")], Annotated[int, Field(ge=1)]] | None


class InferenceRecord(BaseModel):
    """One line of logged traffic (JSONL): an intent classifier's answer to a turn."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[1, 2, 3]
    event: Event
    request_id: RequestId
    conversation_id: ConversationId
    turn: Turn
    timestamp: UtcTime
    model: ModelField
    runtime: Runtime
    text: Text
    intent: Intent
    confidence: Probability
    latency_ms: LatencyMs
    reviewed_label: Intent | None = None
    locale: str | None = None
    pii_scrubbed: PiiCounts = None


class EscalationRecord(BaseModel):
    """The escalation detector's answer to a turn (version 3): the probability that the customer is frustrated and
    the decision at the model's own recall-tuned threshold."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[3]
    role: Literal["escalation_detector"]
    event: Event
    request_id: RequestId
    conversation_id: ConversationId
    turn: Turn
    timestamp: UtcTime
    model: ModelField
    runtime: Runtime
    text: Text
    p_frustrated: Probability
    threshold: Probability
    escalate: bool
    latency_ms: LatencyMs
    locale: str | None = None
    pii_scrubbed: PiiCounts = None


class RankedCandidate(BaseModel):
    """A passage of a rerank request as logged: the client's id, the text (scrubbed) and the model's score."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = None
    text: Text
    score: Annotated[float, Field(allow_inf_nan=False)]  # relevance log-odds


class RerankRecord(BaseModel):
    """The reranker's answer to a query and its candidate passages (version 3): every candidate in the request's
    order with its score, and `ranking`, the indices of the top `top_k` candidates, best first (what was answered)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[3]
    role: Literal["reranker"]
    event: Event
    request_id: RequestId
    conversation_id: ConversationId
    turn: Turn
    timestamp: UtcTime
    model: ModelField
    runtime: Runtime
    query: Text
    candidates: Annotated[list[RankedCandidate], Field(min_length=1, max_length=MAX_CANDIDATES)]
    top_k: Annotated[int, Field(ge=1, le=MAX_CANDIDATES)]
    ranking: list[Annotated[int, Field(ge=0, lt=MAX_CANDIDATES)]]
    latency_ms: LatencyMs
    locale: str | None = None
    pii_scrubbed: PiiCounts = None

    @model_validator(mode="after")
    def _ranking_fits(self) -> RerankRecord:
        n = len(self.candidates)
        if len(set(self.ranking)) != len(self.ranking) or any(i >= n for i in self.ranking):
            raise ValueError(f"ranking must name distinct candidates 0..{n - 1}")
        if len(self.ranking) != min(self.top_k, n):
            raise ValueError(f"ranking holds {len(self.ranking)} candidates, top_k {self.top_k} of {n} asks for "
                             f"{min(self.top_k, n)}")
        return self


# The record class of each role's answers; the intent classifier's is InferenceRecord.
ROLE_RECORDS: dict[str, type[BaseModel]] = {"intent_classifier": InferenceRecord,
                                            "escalation_detector": EscalationRecord, "reranker": RerankRecord}
AnyRecord = InferenceRecord | EscalationRecord | RerankRecord


class ReviewLabel(BaseModel):
    """A person's (or a labelling tool's) verdict on one logged turn, written any number of days after it, into
    `labels-*` files of the traffic store's day partitions (the day it was reviewed). The refresh joins it to the
    turn by request id; the latest review wins."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[2, 3]
    event: Literal["review_label"]
    request_id: RequestId
    reviewed_label: Intent
    reviewer: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]  # who or what reviewed it
    reviewed_at: UtcTime


LABEL_FILE_PREFIX = "labels"  # review labels live in their own files: dt=YYYY-MM-DD/labels-*.jsonl[.gz]
_LABEL_EVENT = re.compile(rb'"event"\s*:\s*"review_label"')
_ROLE = re.compile(rb'"role"\s*:\s*"(escalation_detector|reranker)"')


def parse_line(line: str | bytes, roles: tuple[str, ...] = (INTENT_ROLE,)
               ) -> tuple[AnyRecord | ReviewLabel | None, str | None]:
    """Parse and validate one log line: a logged turn of one of `roles` (by default the intent classifier's, what
    calibration, drift and the label join read) or a review label. Returns (record, None) or (None, reason); a
    record of a role not asked for is refused with a reason, so a reader never takes one role's answers for
    another's."""
    raw = line.encode() if isinstance(line, str) else line
    error = None
    if INTENT_ROLE in roles:
        try:  # turns first: nearly every line is one
            return InferenceRecord.model_validate_json(raw), None
        except ValidationError as exc:
            error = exc
    role = _ROLE.search(raw)
    if role is not None:
        name = role.group(1).decode()
        if name not in roles:
            return None, f"role: a {name} record where {', '.join(roles)} records are read (each model logs in its own folder)"
        try:
            return ROLE_RECORDS[name].model_validate_json(raw), None
        except ValidationError as exc:
            return None, summarize_error(exc)
    if _LABEL_EVENT.search(raw) is None:
        if error is None:  # only other roles asked for: say what this line lacks as one of them
            try:
                ROLE_RECORDS[roles[0]].model_validate_json(raw)
            except ValidationError as exc:
                error = exc
        return None, summarize_error(error) if error is not None else "role: missing"
    try:
        return ReviewLabel.model_validate_json(raw), None
    except ValidationError as exc:
        return None, summarize_error(exc)


def summarize_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "<line>"
        if err["type"] == "json_invalid":
            parts.append(f"malformed JSON: {err['msg'].removeprefix('Invalid JSON: ')}")
        elif err["type"] == "missing":
            parts.append(f"{loc}: missing")
        elif err["type"] == "literal_error" and loc in ("intent", "reviewed_label"):
            parts.append(f"{loc}: unknown intent {err.get('input')!r}")
        elif err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unexpected field")
        else:
            parts.append(f"{loc}: {err['msg']}")
    if len(exc.errors()) > 3:
        parts.append(f"+{len(exc.errors()) - 3} more")
    return "; ".join(parts)


def reason_category(reason: str) -> str:
    """A short bucket for counting quarantine reasons (e.g. 'malformed_json', 'missing:text')."""
    first = reason.split(";")[0]
    if first.startswith("malformed JSON"):
        return "malformed_json"
    field, _, msg = first.partition(": ")
    if msg == "missing":
        return f"missing:{field}"
    if msg.startswith("unknown intent"):
        return f"unknown_intent:{field}"
    if msg == "unexpected field":
        return "unexpected_field"
    if msg.startswith(("Input should be a valid", "Input should be an object")):
        return f"wrong_type:{field}"
    return f"invalid:{field}"


def dump_record(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":"))

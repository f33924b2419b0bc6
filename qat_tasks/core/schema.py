"""The logged-traffic record, version 1.

It extends what the serving layer already writes
    {"event": "quantized_inference", "model": ..., "intent": ..., "confidence": ..., "latency_ms": ...,
     "runtime": "onnxruntime"}
with what calibration and evaluation need: ids, a timestamp, the user's text and, where a person
reviewed the turn, the true label. Records that do not fit are quarantined with the reason, never dropped.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

# Version 2 adds what the writer scrubbed (`pii_scrubbed`, counts by kind) and the review-label record; readers
# take both versions.
SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, 2)

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

# The roles whose answers this schema can log (it records intents): what the serving component serves and shadows.
SERVED_ROLES: tuple[str, ...] = ("intent_classifier",)

# Field limits, shared by the log records and the serving component's requests, so every accepted request can be
# logged and every logged record fits.
MAX_TEXT_CHARS = 4000
MAX_ID_CHARS = 128
MAX_TURN = 500
MAX_LOCALE_CHARS = 35  # the longest BCP 47 tags in use


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


class InferenceRecord(BaseModel):
    """One line of logged traffic (JSONL)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[1, 2]
    event: Literal["quantized_inference", "inference", "shadow_inference"]
    request_id: RequestId
    conversation_id: ConversationId
    turn: Turn
    timestamp: UtcTime
    model: Annotated[str, Field(min_length=1)]
    runtime: Literal["onnxruntime", "pytorch", "transformers", "vllm"]
    text: Text
    intent: Intent
    confidence: Annotated[float, Field(ge=0.0, le=1.0)]
    latency_ms: Annotated[float, Field(ge=0.0)]
    reviewed_label: Intent | None = None
    locale: str | None = None
    # What the writer scrubbed from `text` before logging it: counts by kind ([EMAIL], [PHONE], ...), never values.
    pii_scrubbed: dict[Annotated[str, Field(pattern=r"^[A-Z]{2,10}$")], Annotated[int, Field(ge=1)]] | None = None


class ReviewLabel(BaseModel):
    """A person's (or a labelling tool's) verdict on one logged turn, written any number of days after it, into
    `labels-*` files of the traffic store's day partitions (the day it was reviewed). The refresh joins it to the
    turn by request id; the latest review wins."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[2]
    event: Literal["review_label"]
    request_id: RequestId
    reviewed_label: Intent
    reviewer: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]  # who or what reviewed it
    reviewed_at: UtcTime


LABEL_FILE_PREFIX = "labels"  # review labels live in their own files: dt=YYYY-MM-DD/labels-*.jsonl[.gz]
_LABEL_EVENT = re.compile(rb'"event"\s*:\s*"review_label"')


def parse_line(line: str | bytes) -> tuple[InferenceRecord | ReviewLabel | None, str | None]:
    """Parse and validate one log line: a logged turn or a review label. Returns (record, None) or (None, reason)."""
    raw = line.encode() if isinstance(line, str) else line
    try:  # turns first: nearly every line is one
        return InferenceRecord.model_validate_json(raw), None
    except ValidationError as exc:
        if _LABEL_EVENT.search(raw) is None:
            return None, summarize_error(exc)
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

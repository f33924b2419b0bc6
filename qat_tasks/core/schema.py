"""The logged-traffic record, version 1.

It extends what the serving layer already writes
    {"event": "quantized_inference", "model": ..., "intent": ..., "confidence": ..., "latency_ms": ...,
     "runtime": "onnxruntime"}
with what calibration and evaluation need: ids, a timestamp, the user's text and, where a person
reviewed the turn, the true label. Records that do not fit are quarantined with the reason, never dropped.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1

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


class InferenceRecord(BaseModel):
    """One line of logged traffic (JSONL)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[1]
    event: Literal["quantized_inference", "inference", "shadow_inference"]
    request_id: RequestId
    conversation_id: ConversationId
    turn: Turn
    timestamp: datetime
    model: Annotated[str, Field(min_length=1)]
    runtime: Literal["onnxruntime", "pytorch", "transformers", "vllm"]
    text: Text
    intent: Intent
    confidence: Annotated[float, Field(ge=0.0, le=1.0)]
    latency_ms: Annotated[float, Field(ge=0.0)]
    reviewed_label: Intent | None = None
    locale: str | None = None

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("timestamp has no timezone (log UTC with a trailing Z)")
        return v


def parse_line(line: str | bytes) -> tuple[InferenceRecord | None, str | None]:
    """Parse and validate one log line. Returns (record, None) or (None, reason)."""
    try:
        return InferenceRecord.model_validate_json(line), None
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

"""What each served role takes and answers, and how an answer becomes a traffic record.

  POST /v1/intent      {"text", ...}                                  intent classifier
  POST /v1/escalation  {"text", ...}                                  escalation detector
  POST /v1/rerank      {"query", "candidates": [{"text", "id"?}], "top_k"?, ...}   reranker
  (each also takes "conversation_id"?, "turn"?, "request_id"?, "locale"?)

The request limits are the traffic schema's, so every accepted request can be logged. Everything a customer typed
(text, query, passages, passage ids) is scrubbed of personal data before it reaches a record; the models answer
it as sent.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from qat_tasks.core.schema import MAX_CANDIDATES, MAX_ID_CHARS, ConversationId, Locale, RequestId, Text, Turn
from qat_tasks.data.pii import scrub


class _Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conversation_id: ConversationId | None = None
    turn: Turn = 0
    request_id: RequestId | None = None
    locale: Locale | None = None


class IntentRequest(_Turn):
    text: Text


class EscalationRequest(_Turn):
    text: Text


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text
    id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = None


class RerankRequest(_Turn):
    query: Text
    candidates: Annotated[list[Candidate], Field(min_length=1, max_length=MAX_CANDIDATES)]
    top_k: Annotated[int, Field(ge=1, le=MAX_CANDIDATES)] = 10


ROLE_OF = {IntentRequest: "intent_classifier", EscalationRequest: "escalation_detector", RerankRequest: "reranker"}
ENDPOINTS = {"intent_classifier": "/v1/intent", "escalation_detector": "/v1/escalation", "reranker": "/v1/rerank"}


def inputs(req) -> object:
    """What the models answer: the request as sent."""
    if isinstance(req, RerankRequest):
        return req.query, [c.text for c in req.candidates], req.top_k
    return req.text


def logged_request(role: str, req) -> tuple[dict, Counter]:
    """The request's fields as a record keeps them (scrubbed of personal data), and what was scrubbed, by kind."""
    found: Counter = Counter()
    if role != "reranker":
        fields = {"text": scrub(req.text, found)}
        return (fields if role == "intent_classifier" else {"role": role, **fields}), found
    candidates = [{"id": scrub(c.id, found) if c.id is not None else None, "text": scrub(c.text, found)}
                  for c in req.candidates]
    return {"role": role, "query": scrub(req.query, found), "top_k": req.top_k, "candidates": candidates}, found


def answer_fields(role: str, answer: dict, request_fields: dict) -> dict:
    """A model's answer as record fields (the champion's and the shadow's records differ only in these)."""
    if role == "intent_classifier":
        return {"intent": answer["intent"], "confidence": round(answer["confidence"], 6)}
    if role == "escalation_detector":
        return {"p_frustrated": round(answer["p_frustrated"], 6),
                "threshold": round(answer["threshold"], 6), "escalate": bool(answer["escalate"])}
    return {"candidates": [{**c, "score": round(s, 6)} for c, s in zip(request_fields["candidates"], answer["scores"],
                                                                        strict=True)],
            "ranking": list(answer["ranking"])}


def agree(role: str, champion: dict, shadow: dict) -> bool:
    """Whether two answers (record fields) agree: the same intent, the same escalate decision, the same top passage."""
    if role == "intent_classifier":
        return champion["intent"] == shadow["intent"]
    if role == "escalation_detector":
        return champion["escalate"] == shadow["escalate"]
    return champion["ranking"][:1] == shadow["ranking"][:1]


def response(role: str, answer: dict, req) -> dict:
    """The client's answer body (model, version, request id and latency are added by the service)."""
    if role == "reranker":
        return {"results": [{"index": i, "id": req.candidates[i].id, "score": answer["scores"][i]}
                            for i in answer["ranking"]]}
    return dict(answer)


def request_of_record(rec) -> tuple[dict, Counter]:
    """A logged record's request fields scrubbed again (an older writer's logs may still carry personal data), as
    `logged_request` logs them, and what this scrub found."""
    found: Counter = Counter()
    role = getattr(rec, "role", "intent_classifier")
    if role == "reranker":
        return {"role": role, "query": scrub(rec.query, found), "top_k": rec.top_k,
                "candidates": [{"id": scrub(c.id, found) if c.id is not None else None, "text": scrub(c.text, found)}
                               for c in rec.candidates]}, found
    fields = {"text": scrub(rec.text, found)}
    return (fields if role == "intent_classifier" else {"role": role, **fields}), found


def inputs_of(fields: dict) -> object:
    """The model inputs of logged request fields (a replay sends the scrubbed request through both models)."""
    if fields.get("role") == "reranker":
        return fields["query"], [c["text"] for c in fields["candidates"]], fields["top_k"]
    return fields["text"]

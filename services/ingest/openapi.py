"""Ingest's OpenAPI: the request bodies (read by hand in routes.py, so FastAPI cannot infer them)
from the event's JSON Schema, and every answer's body."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from services.core.http import AUTH_RESPONSES, ErrorBody, FieldErrorModel
from services.core.settings import SCHEMAS_DIR


class Accepted(BaseModel):
    event_id: str
    status: Literal["accepted"]


class BatchResult(BaseModel):
    index: int = Field(description="Position of the event in the batch (0-based)")
    event_id: str | None = Field(description="null when the event_id itself was missing or invalid")
    status: Literal["accepted", "rejected"]
    errors: list[FieldErrorModel] | None = None


class BatchOutcome(BaseModel):
    accepted: int
    rejected: int
    results: list[BatchResult]


class Unavailable(BaseModel):
    detail: str | list[FieldErrorModel] = Field(
        description="Why; nothing in the request was accepted, retry after `Retry-After` s"
    )


def _event_schema() -> dict[str, Any]:
    """The contract's schema, as OpenAPI 3.1 embeds it: without its own $schema/$id, and with the
    patterns' `$(?!\\n)` (a Python-regex guard, see the schema's $comment) back to plain `$`."""
    text = (SCHEMAS_DIR / "touchpoint-event.v1.schema.json").read_text()
    schema = json.loads(text.replace("$(?!\\\\n)", "$"))
    for key in ("$schema", "$id", "$comment"):
        schema.pop(key, None)
    return schema


EVENT_SCHEMA = _event_schema()

_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body is not valid JSON"},
    413: {"model": ErrorBody, "description": "The body (or the batch) is past its limit"},
    415: {"model": ErrorBody, "description": "Unsupported content type; `allowed` lists the supported ones"},
    503: {
        "model": Unavailable,
        "description": "Broker unavailable, ingest overloaded, or the API key cannot be verified (database "
        "down); retry after `Retry-After` s",
    },
    **AUTH_RESPONSES,
}

EVENT_ROUTE: dict[str, Any] = {
    "summary": "Post one touchpoint event",
    "description": "202 once the broker acknowledged the write (`acks=all`): the event will be scored "
    "exactly once. Needs the scope `events:write`; the tenant is the API key's.",
    "response_model": Accepted,
    "responses": {
        **_BODY_ERRORS,
        422: {"model": ErrorBody, "description": "The event is invalid: every error names its field"},
    },
    "openapi_extra": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": EVENT_SCHEMA}}},
    },
}

BATCH_ROUTE: dict[str, Any] = {
    "summary": "Post a batch of touchpoint events",
    "description": "JSON `{\"events\": [...]}` or NDJSON, at most 1000 events and 1 MiB. Valid events are "
    "written, invalid ones reported; 422 if none is valid. Needs the scope `events:write`.",
    "response_model": BatchOutcome,
    "responses": {
        **_BODY_ERRORS,
        422: {
            "description": "No event is valid (the outcome, every event's errors), or the body is not a batch",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/BatchOutcome"},
                            {"$ref": "#/components/schemas/ErrorBody"},
                        ]
                    }
                }
            },
        },
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["events"],
                        "properties": {"events": {"type": "array", "maxItems": 1000, "items": EVENT_SCHEMA}},
                    }
                },
                "application/x-ndjson": {"schema": {"type": "string", "description": "One event per line"}},
            },
        },
    },
}

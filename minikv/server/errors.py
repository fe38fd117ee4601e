"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with the HTTP status.

Three sources turn into these:
- the request body does not parse or has the wrong types (FastAPI's validation, 422 by default) -> 400;
- SamplingParams or the engine refuse a value (minikv.errors.InvalidRequestError) -> 400, with `param` read
  from the message (minikv's messages always name the field first);
- the server itself: unknown model (404), waiting queue full (503 + Retry-After), engine failure (500).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error to send back as an HTTP response in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def engine_failure(message: str) -> APIError:
    return APIError(500, f"the engine failed on this request: {message}", type="internal_error",
                    code="engine_error")


# --- FastAPI's validation errors --------------------------------------------------------------------


def from_validation_errors(errors: list[dict], known_fields: set[str]) -> APIError:
    """The first of pydantic's errors as a 400; `param` is the field's path (e.g. "messages[0].role").

    Pydantic's `loc` mixes field names with the names of union members it tried ("str", "list[int]"): only
    names in `known_fields` (the fields of the request models) and list indices make up the path.
    """
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return bad_request(f"the request body is not valid JSON: {reason}")
    if not loc:
        return bad_request("the request body must be a JSON object (a dict of fields)")
    param = _field_path(loc, known_fields)
    if first.get("type") == "extra_forbidden":  # an unknown key where the object is closed (stream_options)
        param = f"{_field_path(loc[:-1], known_fields)}.{loc[-1]}" if len(loc) > 1 else str(loc[-1])
        return bad_request(f"{param} is not a known field: {first.get('msg', 'not permitted')}", param)
    if first.get("type") == "missing":
        return bad_request(f"{param} is required", param)
    got = first.get("input")
    shown = json.dumps(got)[:80] if _is_json(got) else repr(got)[:80]
    alternatives = _union_members(errors, loc, known_fields)
    if len(alternatives) > 1:  # a union field (e.g. prompt: str | list[int]): say what it may be
        return bad_request(f"{param} must be one of: {', '.join(alternatives)} (got {shown})", param)
    return bad_request(f"{param}: {first.get('msg', 'invalid value')} (got {shown})", param)


def _union_members(errors: list[dict], loc: list, known_fields: set[str]) -> list[str]:
    """The types pydantic tried for the field at `loc`, when it is a union (their names follow the field)."""
    field = _path_parts(loc, known_fields)
    members: list[str] = []
    for error in errors:
        parts = [part for part in error.get("loc", ()) if part != "body"]
        tags = [part for part in parts if part not in _path_parts(parts, known_fields)]
        if _path_parts(parts, known_fields)[: len(field)] == field and tags and tags[0] not in members:
            members.append(tags[0])
    return members


def _path_parts(loc, known_fields: set[str]) -> list:
    """The parts of a pydantic location that are field names or list indices (not union member names)."""
    return [part for part in loc if isinstance(part, int) or part in known_fields]


def _field_path(loc: list, known_fields: set[str]) -> str:
    path = ""
    for part in _path_parts(loc, known_fields):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or str(loc[0])


def _is_json(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# --- minikv's own validation ------------------------------------------------------------------------

# minikv's InvalidRequestError messages name the field they are about; these rules find it. The names are
# SamplingParams' (and the engine's); each endpoint maps them to its own request fields.
_FIELD_RULES = (
    (re.compile(r"SamplingParams\.(\w+)"), None),  # "SamplingParams.top_p=2 is invalid: ..."
    (re.compile(r"^(kv_budget|stop_token_ids|positions|archive_budget)\b"), None),  # the engine's checks of those
    (re.compile(r"max_model_len"), "max_tokens"),  # prompt + max_tokens over the model's length
    (re.compile(r"messages|chat template|role"), "messages"),
    (re.compile(r"prompt|token ids"), "prompt"),
)


def engine_field(message: str) -> str | None:
    """The SamplingParams / engine field an InvalidRequestError message is about, or None."""
    for pattern, field in _FIELD_RULES:
        match = pattern.search(message)
        if match:
            return field or match.group(1)
    return None


def from_invalid_request(err: Exception, request_field: Callable[[str | None], str | None] = lambda name: name
                         ) -> APIError:
    """minikv's InvalidRequestError as a 400 naming the field of the request body (`request_field` maps the
    engine's field names to the endpoint's, e.g. chat's max_completion_tokens for max_tokens)."""
    engine_name = engine_field(str(err))
    message = str(err).replace("SamplingParams.", "")
    param = request_field(engine_name)
    if engine_name and param != engine_name:
        message = re.sub(rf"\b{engine_name}\b", param, message)
    if param and param not in message:
        message = f"{param}: {message}"
    return bad_request(message, param)

"""Handlers of the prediction routes: each looks its policy up on every request, reads and
validates the body from bytes in one call, calls the policy service, and names the service's
row errors by the request's own layout."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, NamedTuple

from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from policy_server.errors import FieldError, InvalidObservation, InvalidRows
from policy_server.policy.loaded import LoadedPolicy
from policy_server.protocols.rest.bodies import (
    Parsed,
    batch_limit,
    rows_of,
    same_layout,
    unwrap,
    validators,
)
from policy_server.protocols.rest.responses import json_response, policy_info
from policy_server.protocols.routes import header, read_body
from policy_server.serving.registry import PolicyEntry, PolicyVersion
from policy_server.serving.service import Group, Prediction

if TYPE_CHECKING:
    from policy_server.protocols.rest.operations import Context, Operation


SEED_MAX = 2**63 - 1
_DIGITS = re.compile(rb"^[0-9]{1,19}$")
Handler = Callable[[Request], Awaitable[Response]]


class BatchLimit(NamedTuple):
    """A policy's configured batch limit, lowered where the body limit would not take it."""

    max_observations: int
    max_body_bytes: int

    def of(self, policy: LoadedPolicy) -> int:
        return batch_limit(policy, self.max_observations, self.max_body_bytes)


class _Handler:
    def __init__(self, context: Context, name: str | None, pinned: bool) -> None:
        self.context = context
        self.name = name
        self.pinned = pinned

    def _entry(self, request: Request) -> PolicyEntry:
        entry = self.context.registry.entry(self.name)
        self.context.keys.check(request, entry)
        return entry

    def _pinned(self, request: Request, entry: PolicyEntry) -> PolicyVersion | None:
        """The version the path names. Looked up only once the body has arrived, and leased
        in the same step of the event loop: a reload meanwhile is seen, never half seen."""
        if not self.pinned:
            return None
        return self.context.registry.resolve(entry.name, request.path_params["version"])


class SchemaHandler(_Handler):
    async def __call__(self, request: Request) -> Response:
        entry = self._entry(request)
        target = self._pinned(request, entry) or entry.route(None)
        _label(request, target)
        return json_response(policy_info(target.loaded).model_dump())


class PredictionHandler(_Handler):
    def __init__(self, context: Context, operation: Operation, name: str | None, pinned: bool):
        super().__init__(context, name, pinned)
        self.operation = operation

    async def __call__(self, request: Request) -> Response:
        entry = self._entry(request)
        operation = self.operation
        seed = _seed(request) if operation.seeded and request.scope["query_string"] else None
        body = await _json_body(request)
        # From here to the service's lease, nothing awaits: the versions chosen stay loaded.
        pinned = self._pinned(request, entry)
        reference = pinned or entry.primary or entry.route(None)
        limit = BatchLimit(entry.settings.max_batch_observations, self.context.max_body_bytes)
        parsed = _parse(reference.loaded, operation, body, limit)
        if operation.mode == "distribution":
            return await self._distribution(request, entry, pinned, parsed, body, limit)
        groups = [
            self._group(version, reference, parsed, body, limit, indices)
            for version, indices in self._groups(entry, pinned, parsed)
        ]
        try:
            answered = await self.context.service.predict_groups(
                groups, deterministic=operation.mode == "mode", seed=seed, pinned=self.pinned
            )
        except InvalidRows as error:
            raise _named(error, operation.batch, range(parsed.count)) from None
        _label(request, groups[0].version)
        answers: Sequence[Prediction | None] = answered[0]
        if len(groups) > 1:
            answers = [None] * parsed.count
            for group, predictions in zip(groups, answered, strict=True):
                for index, prediction in zip(group.positions or (), predictions, strict=True):
                    answers[index] = prediction
        if operation.batch:
            return json_response({"predictions": answers})
        return json_response(answers[0])

    def _groups(
        self, entry: PolicyEntry, pinned: PolicyVersion | None, parsed: Parsed
    ) -> list[tuple[PolicyVersion, list[int]]]:
        """Which version answers which observation: sticky per episode, else one draw per
        request from the traffic split."""
        count = parsed.count
        if pinned is not None:
            return [(pinned, list(range(count)))]
        episodes = parsed.episodes
        if episodes is None or all(e.episode_id is None for e in episodes):
            return [(entry.route(None), list(range(count)))]
        unpinned = entry.route(None)
        groups: dict[int, tuple[PolicyVersion, list[int]]] = {}
        for index, episode in enumerate(episodes):
            version = entry.route(episode.episode_id) if episode.episode_id else unpinned
            groups.setdefault(id(version), (version, []))[1].append(index)
        return list(groups.values())

    def _group(
        self,
        version: PolicyVersion,
        reference: PolicyVersion,
        parsed: Parsed,
        body: bytes,
        limit: BatchLimit,
        indices: list[int],
    ) -> Group:
        """The rows of the observations at `indices`, made for `version`'s layout."""
        if not same_layout(reference.loaded, version.loaded):
            parsed = _parse(version.loaded, self.operation, body, limit)
        whole = len(indices) == parsed.count
        episodes = _pick(parsed.episodes, indices, whole)
        masks = _pick(parsed.masks, indices, whole)
        if parsed.rows is not None:
            rows = parsed.rows if whole else parsed.rows[indices]
        else:
            observations = parsed.observations
            observations = observations if whole else [observations[i] for i in indices]
            rows = rows_of(version.loaded, observations, parsed.raw_model)
        return Group(version, rows, episodes, masks, None if whole else indices)

    async def _distribution(
        self,
        request: Request,
        entry: PolicyEntry,
        pinned: PolicyVersion | None,
        parsed: Parsed,
        body: bytes,
        limit: BatchLimit,
    ) -> Response:
        version = pinned or entry.route(parsed.episode_id)
        if not same_layout((pinned or entry.primary or version).loaded, version.loaded):
            parsed = _parse(version.loaded, self.operation, body, limit)
        rows = parsed.rows
        if rows is None:
            rows = rows_of(version.loaded, parsed.observations, parsed.raw_model)
        try:
            result = await self.context.service.distribution(
                version, rows, parsed.masks, parsed.episodes
            )
        except InvalidRows as error:
            raise _named(error, False, [0]) from None
        answer = asdict(result)
        if parsed.episode_id is not None:
            answer["episode_id"] = parsed.episode_id
        _label(request, version)
        return json_response(answer)


def _pick(values: list[Any] | None, indices: list[int], whole: bool) -> list[Any] | None:
    if values is None or whole:
        return values
    return [values[i] for i in indices]


def _parse(policy: LoadedPolicy, operation: Operation, body: bytes, limit: BatchLimit) -> Parsed:
    checks = validators(policy, *limit)
    rows = checks.flat_rows(operation.kind, body)
    if rows is not None:
        return Parsed([], None, None, rows=rows)
    try:
        value = checks.validate(operation.kind, body)
    except ValidationError as error:
        raise RequestValidationError(
            _refusal(checks.adapters[operation.kind], body, error)
        ) from None
    return unwrap(value.observations if operation.batch else [value], policy.raw_model)


def _refusal(adapter: TypeAdapter[Any], body: bytes, error: ValidationError) -> list[Any]:
    """The errors FastAPI's own body handling gives for a refused body: the standard
    library's parse (NaN and Infinity reach the field that holds them), then validation of
    the Python value, whose messages FastAPI's users know. Only refused bodies pay for it.
    A body that cannot be decoded at all (bad syntax, bad UTF-8, too deep, a number too
    long) is one kind of error, `json_invalid`, answered 422."""
    if not body:
        return [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as decode:
        message = getattr(decode, "msg", None) or str(decode) or type(decode).__name__
        where = ("body", getattr(decode, "pos", 0))
        return [
            {
                "type": "json_invalid",
                "loc": where,
                "msg": "JSON decode error",
                "ctx": {"error": message},
            }
        ]
    try:
        adapter.validate_python(value, from_attributes=True)  # as FastAPI validates bodies
    except ValidationError as python:
        error = python
    except RecursionError:
        pass
    return [e | {"loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]


async def _json_body(request: Request) -> bytes:
    content_type = header(request.scope, b"content-type")
    if content_type is not None and b"json" not in content_type.lower():
        raise RequestValidationError(
            [{"type": "content_type", "loc": ("body",), "msg": "not a JSON body"}]
        )
    return await read_body(request.receive)


def _seed(request: Request) -> int | None:
    values = request.query_params.getlist("seed")
    if not values:
        return None
    raw = values[-1].encode()
    if len(values) > 1 or not _DIGITS.match(raw) or int(raw) > SEED_MAX:
        message = f"Input should be one whole number from 0 to {SEED_MAX}"
        raise RequestValidationError(
            [{"type": "int_parsing", "loc": ("query", "seed"), "msg": message}]
        )
    return int(raw)


def _named(error: InvalidRows, batch: bool, indices: Sequence[int]) -> InvalidObservation:
    """The service's row errors, named by the request's own layout."""
    fields = []
    for row in error.rows:
        where = f"observations.{indices[row.row]}" if batch else ""
        name = ".".join(part for part in (where, row.field) if part) or "body"
        fields.append(FieldError(name, row.message))
    return InvalidObservation(error.message, fields)


def _label(request: Request, version: PolicyVersion) -> None:
    """Tell the request observer which policy and version answered."""
    request.scope["policy_server.answered"] = (version.name, version.version)

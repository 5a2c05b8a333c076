"""The Open Inference Protocol's data plane, shared by its REST routes and its gRPC service:
requests as tensors in, a call of the policy service, tensors out. No wire format here.

A model is a policy; its versions are the policy's. A request without a version follows the
traffic split (sticky per episode, as on the JSON routes), so canaries, shadows and the
decision log behave exactly as they do there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policy_server import __version__
from policy_server.errors import InvalidRows
from policy_server.experience.log import DecisionLog
from policy_server.protocols.auth import KeyRing
from policy_server.protocols.v2.parameters import read_options
from policy_server.protocols.v2.sequences import Sequences
from policy_server.protocols.v2.signature import (
    Signature,
    output_tensors,
    read_inputs,
    signature_of,
)
from policy_server.protocols.v2.tensors import InvalidTensor, Tensor
from policy_server.serving.registry import PolicyEntry, PolicyRegistry, PolicyVersion, State
from policy_server.serving.service import PolicyService

SERVER_NAME = "policy-server"
EXTENSIONS = ("binary_tensor_data", "sequence", "parameters")


@dataclass
class InferRequest:
    model: str
    version: str | None
    inputs: list[Tensor]
    outputs: list[str] | None = None  # None: every output
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass
class InferResponse:
    model: str
    version: str
    outputs: list[Tensor]
    parameters: dict[str, Any]
    id: str | None = None


class DataPlane:
    def __init__(
        self, service: PolicyService, keys: KeyRing, log: DecisionLog | None = None
    ) -> None:
        self.service = service
        self.keys = keys
        self.sequences = Sequences(service, log)

    @property
    def registry(self) -> PolicyRegistry:
        return self.service.registry

    # --- health and metadata, open to every caller (Kubernetes probes) ----------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def ready(self) -> bool:
        return self.registry.all_ready()

    # --- per model: the policy's key ----------------------------------------------------------

    def entry(self, name: str, key: str | None) -> PolicyEntry:
        entry = self.registry.entry(name)
        self.keys.check_key(entry, key)
        return entry

    def check(self, name: str, version: str | None, key: str | None) -> None:
        """The key, and the version if one is named (404 when it does not exist)."""
        self.entry(name, key)
        if version:
            self.registry.resolve(name, version)

    def model_ready(self, name: str, version: str | None, key: str | None) -> bool:
        entry = self.entry(name, key)
        if not version:
            return entry.primary is not None
        found = entry.versions.get(version)
        if found is None:
            self.registry.resolve(name, version)  # raises the usual 404
        return found is not None and found.state is State.READY

    def model_metadata(self, name: str, version: str | None, key: str | None) -> dict[str, Any]:
        entry = self.entry(name, key)
        target = self.registry.resolve(name, version) if version else _described(entry)
        signature = signature_of(target.loaded)
        ready = [v.version for v in entry.ordered() if v.state is State.READY]
        return {
            "name": entry.name,
            "versions": [target.version] if version else ready,
            "platform": signature.platform,
            "inputs": [spec.describe() for spec in signature.inputs],
            "outputs": [spec.describe() for spec in signature.outputs],
        }

    async def infer(self, request: InferRequest, key: str | None) -> InferResponse:
        entry = self.entry(request.model, key)
        pinned = self.registry.resolve(entry.name, request.version) if request.version else None
        options = read_options(request.parameters)
        version = pinned or entry.route(options.episode_id)
        signature = signature_of(version.loaded)
        names = _requested(signature, request.outputs)
        rows = read_inputs(signature, request.inputs)
        episode = self.sequences.episode(options)
        if episode is not None and len(rows.rows) != 1:
            raise InvalidTensor(
                f"a request of episode {episode.episode_id!r} holds one observation, "
                f"not {len(rows.rows)}: a sequence's steps come one request each"
            )
        try:
            decisions = await self.service.decide(
                version,
                rows.rows,
                episodes=None if episode is None else [episode],
                masks=rows.masks,
                deterministic=options.deterministic,
                seed=options.seed,
                pinned=pinned is not None,
            )
        except InvalidRows as error:
            raise _named(error) from None
        first = decisions.predictions[0]
        await self.sequences.after(options)
        parameters: dict[str, Any] = {}
        if episode is not None:
            parameters = {"episode_id": first["episode_id"], "step": first["step"]}
        return InferResponse(
            entry.name,
            version.version,
            output_tensors(signature, version.loaded, decisions, names),
            parameters,
            request.id,
        )


def _described(entry: PolicyEntry) -> PolicyVersion:
    """The version whose tensors a model's metadata describes: the one its routes publish."""
    return entry.primary or entry.route(None)


def _requested(signature: Signature, outputs: list[str] | None) -> list[str]:
    names = signature.output_names
    if outputs is None:
        return list(names)
    unknown = [name for name in outputs if name not in names]
    if unknown:
        raise InvalidTensor(f"unknown output(s) {unknown}; the model has {list(names)}")
    return outputs


def _named(error: InvalidRows) -> InvalidTensor:
    """The service's row errors in the protocol's words: observations by their index."""
    parts = [
        f"observation {row.row}" + (f" {row.field}" if row.field else "") + f": {row.message}"
        for row in error.rows
    ]
    return InvalidTensor(f"{error.message}: " + "; ".join(parts) if parts else error.message)

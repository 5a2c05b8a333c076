"""The Open Inference Protocol's REST bodies, as the OpenAPI document describes them. The
routes read and write the bodies themselves (`routes.py`); these models never validate."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Parameters = dict[str, bool | int | float | str]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a variable dimension (the batch).")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2RequestInput(BaseModel):
    name: str = Field(
        description="`observations` (FP32 [-1, width]), or one tensor per schema field, "
        "named as the field; optionally `action_mask` (BOOL [-1, actions])."
    )
    shape: list[int]
    datatype: str
    parameters: Parameters | None = Field(
        default=None, description="`binary_data_size`: the tensor's bytes follow the JSON."
    )
    data: list[Any] | None = Field(default=None, description="Flat or nested, row-major.")


class V2RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(
        default=None, description="`binary_data`: answer this output in binary."
    )


class V2InferenceRequest(BaseModel):
    """An inference request; with the binary tensor extension the JSON is followed by the
    tensors' bytes and its length is sent as header `Inference-Header-Content-Length`."""

    id: str | None = None
    parameters: Parameters | None = Field(
        default=None,
        description="`deterministic` (bool), `seed` (int), `episode_id` or `sequence_id` "
        "with `sequence_start` / `sequence_end` (an episode), `reward` (the reward that "
        "followed the episode's previous decision), `binary_data_output`.",
    )
    inputs: list[V2RequestInput]
    outputs: list[V2RequestOutput] | None = Field(
        default=None, description="The outputs to answer; all of them when absent."
    )


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class V2InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters | None = Field(
        default=None, description="`episode_id` and `step`, for a request of an episode."
    )
    outputs: list[V2ResponseOutput]


class V2Error(BaseModel):
    error: str

"""Action spaces a policy can have, as RLlib lays out their logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Discrete:
    """One categorical action; the logits are its n unnormalised log-probabilities."""

    n: int

    @property
    def logits_width(self) -> int:
        return self.n

    def describe(self) -> dict[str, Any]:
        return {"type": "Discrete", "n": self.n}


@dataclass(frozen=True)
class MultiDiscrete:
    """A tuple of categorical actions; the logits are their blocks, concatenated."""

    nvec: tuple[int, ...]

    @property
    def logits_width(self) -> int:
        return sum(self.nvec)

    def describe(self) -> dict[str, Any]:
        return {"type": "MultiDiscrete", "nvec": list(self.nvec)}


@dataclass(frozen=True)
class Box:
    """A vector of continuous actions; the logits are the means, then the log-stds."""

    dim: int

    @property
    def logits_width(self) -> int:
        return 2 * self.dim

    def describe(self) -> dict[str, Any]:
        return {"type": "Box", "shape": [self.dim]}


ActionSpace = Discrete | MultiDiscrete | Box


def categorical_sizes(space: ActionSpace) -> tuple[int, ...]:
    """The category counts of each component of a discrete space."""
    if isinstance(space, Discrete):
        return (space.n,)
    if isinstance(space, MultiDiscrete):
        return space.nvec
    raise TypeError(f"{space} is not discrete")


def action_width(space: ActionSpace) -> int:
    """Values in one answer's `actions`: one per component, or per dimension for Box."""
    if isinstance(space, Discrete):
        return 1
    if isinstance(space, MultiDiscrete):
        return len(space.nvec)
    return space.dim


def space_from_dict(description: dict[str, Any]) -> ActionSpace:
    """Inverse of `describe()`: {"type": "Discrete", "n": 4} and the like."""
    kind = description.get("type")
    if kind == "Discrete":
        return Discrete(int(description["n"]))
    if kind == "MultiDiscrete":
        return MultiDiscrete(tuple(int(n) for n in description["nvec"]))
    if kind == "Box":
        shape = description["shape"]
        return Box(int(shape[0]) if isinstance(shape, list) else int(shape))
    raise ValueError(
        f"unknown action space {description!r}; use {{type: Discrete, n: N}}, "
        "{type: MultiDiscrete, nvec: [N1, N2]} or {type: Box, shape: [D]}"
    )

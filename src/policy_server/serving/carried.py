"""What a recurrent policy's step carries to the next one, as bytes (held by the episode
store) and as an opaque, signed string (handed to clients that keep the state themselves).

The bytes are float32 values: each state tensor's row, then the answered action (one value
per action component, the actions of discrete spaces exactly representable). The string is
that, bound to the policy and version that produced it and signed with the store's secret
(HMAC-SHA256), so a tampered, truncated or foreign string is refused, never fed to the model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from policy_server.runtime.base import Recurrence

_TAG_BYTES = 16
_PREFIX = "s1."


class ForeignState(ValueError):
    """A `state` string this server did not issue for this policy version."""


@dataclass(frozen=True)
class CarriedCodec:
    """Encodes and decodes what one recurrent version carries from step to step."""

    policy: str
    version: str
    recurrence: Recurrence
    secret: bytes

    @property
    def width(self) -> int:
        return self.recurrence.state_width + self.recurrence.action_width

    def encode(
        self, state: tuple[npt.NDArray[np.float32], ...], actions: npt.NDArray[np.float32]
    ) -> list[bytes]:
        """One row per observation: its state after the step, then its answered action."""
        parts = [s.reshape(len(s), -1) for s in state] + [actions.reshape(len(actions), -1)]
        rows = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)
        return [row.tobytes() for row in rows]

    def decode(
        self, carried: bytes
    ) -> tuple[list[npt.NDArray[np.float32]], npt.NDArray[np.float32]]:
        """The state rows and the previous action that `carried` holds."""
        values = np.frombuffer(carried, dtype=np.float32)
        if values.size != self.width:
            raise ForeignState(f"holds {values.size} values; this policy carries {self.width}")
        states, start = [], 0
        for size in self.recurrence.state_sizes:
            states.append(values[start : start + size])
            start += size
        return states, values[start:]

    def _tag(self, carried: bytes) -> bytes:
        message = b"\0".join((self.policy.encode(), self.version.encode(), carried))
        return hmac.new(self.secret, message, hashlib.sha256).digest()[:_TAG_BYTES]

    def sign(self, carried: bytes) -> str:
        token = base64.urlsafe_b64encode(self._tag(carried) + carried).rstrip(b"=")
        return _PREFIX + token.decode()

    def verify(self, text: str) -> bytes:
        """The carried bytes of a string `sign` made for this policy version."""
        if not text.startswith(_PREFIX):
            raise ForeignState("is not a state string this server issued")
        body = text[len(_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise ForeignState("is not a state string this server issued") from None
        tag, carried = raw[:_TAG_BYTES], raw[_TAG_BYTES:]
        if len(tag) < _TAG_BYTES or not hmac.compare_digest(tag, self._tag(carried)):
            raise ForeignState(
                f"was not issued for policy {self.policy!r} version {self.version!r} by this "
                "server, or was altered"
            )
        if len(carried) != 4 * self.width:
            raise ForeignState(f"holds the wrong number of values for {self.policy!r}")
        return carried

"""The optional extras of pyproject.toml, and the one message for a missing one.

Heavy dependencies are imported where they are used. When one is missing, the error says
what needed it, the `pip install` line that brings it and the `make` target that installs it
in a checkout, whatever the error's type: a policy that cannot load is a `PolicyLoadError`,
unavailable SDKs a `ClientsUnavailable`, anything else a `MissingExtra`.
"""

from __future__ import annotations

# Each extra and the make target of a checkout that installs it.
MAKE_TARGETS = {
    "tensorflow": "make serve",
    "onnx": "make serve",
    "ui": "make ui",
    "clients": "make install",
    "ray": "make install",
    "experience": "make install",
    "examples": "make example",
    "bench": "make bench",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says how to install it."""


def missing_extra(
    extra: str,
    what: str,
    error: type[Exception] = MissingExtra,
    *,
    cause: BaseException | None = None,
) -> Exception:
    """The error to raise where `what` found the `extra` extra missing:
    `raise missing_extra("onnx", "the ONNX runtime", PolicyLoadError) from None`."""
    reason = f" ({cause})" if cause is not None else ""
    return error(
        f"{what} needs the {extra} extra{reason}: pip install 'policy-server[{extra}]' "
        f"(in a checkout: pip install -e '.[{extra}]', or {MAKE_TARGETS[extra]})"
    )

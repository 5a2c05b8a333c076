"""Start-up around uvicorn: what is checked before the policies load, and Ctrl-C.

- The ports are checked before any policy loads: otherwise a taken port surfaces only after
  the model has loaded, as a traceback from inside the application's start-up that never
  says which port, or which flag, is the problem.
- A Ctrl-C before the server serves interrupts the start-up (exit 130, see `cli.py`):
  uvicorn alone would finish starting, bind the port, then stop and exit 0, and a
  KeyboardInterrupt raised inside a garbage collector's `__del__` was lost altogether.
  Once it serves, a Ctrl-C is the usual graceful stop.
- The well-known Pathmind demo key served beyond this machine is warned about.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, Self

import uvicorn
from fastapi import FastAPI
from uvicorn.lifespan.on import LifespanOn

from policy_server.hosting.connection_limits import uvicorn_options
from policy_server.logs import configure_logging
from policy_server.protocols.auth import KeyRing
from policy_server.serving.registry import PolicyRegistry
from policy_server.settings import Settings

# The key of every Pathmind export's schema.yaml, and of the original server's examples.
PATHMIND_DEMO_KEY = "1234567asdfgh"
logger = logging.getLogger(__name__)


class PortUnavailable(Exception):
    """A port of the settings cannot be listened on; the message says which and what to do."""


def grpc_checked(settings: Settings) -> Settings:
    """The settings, with the gRPC port off when its extra is missing and the port is the
    default; PortUnavailable when it was asked for."""
    if not settings.grpc_port or all(
        importlib.util.find_spec(name) is not None for name in ("grpc", "tritonclient")
    ):
        return settings
    remedy = "pip install 'policy-server[grpc]', or --grpc-port 0 to serve without gRPC"
    if "grpc_port" in settings.model_fields_set:
        raise PortUnavailable(f"--grpc-port {settings.grpc_port} needs the grpc extra: {remedy}")
    configure_logging(settings.log_level)  # the warning is a JSON line on stdout, as all
    logger.warning("no gRPC port: the grpc extra is not installed (%s)", remedy)
    return settings.model_copy(update={"grpc_port": 0})


def check_ports(settings: Settings) -> None:
    """Raise PortUnavailable, naming the flag to change, for a port that cannot be bound."""
    if settings.metrics_port and settings.metrics_port == settings.port:
        raise PortUnavailable(
            f"--port and --metrics-port are both {settings.port}; give the metrics another "
            "port with --metrics-port, or 0 to turn metrics off"
        )
    if settings.grpc_port and settings.grpc_port in (settings.port, settings.metrics_port):
        raise PortUnavailable(
            f"--grpc-port {settings.grpc_port} is also --port or --metrics-port; give gRPC "
            "another port with --grpc-port, or 0 to turn it off"
        )
    if settings.grpc_port:
        _check(
            settings.host,
            settings.grpc_port,
            "the gRPC port",
            "choose another with --grpc-port, or 0 to turn gRPC off",
        )
    if settings.port:
        _check(settings.host, settings.port, "the HTTP port", "choose another with --port")
    if settings.metrics_port:
        _check(
            settings.host,
            settings.metrics_port,
            "the metrics port",
            "choose another with --metrics-port, or 0 to turn metrics off",
        )


def _check(host: str, port: int, role: str, remedy: str) -> None:
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise PortUnavailable(f"cannot listen on --host {host}: {error.strerror}") from None
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            # As uvicorn and prometheus-client bind: a port left in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise PortUnavailable(
                        f"{role} {shown} is already in use (by another server?); {remedy}"
                    ) from None
                if error.errno == errno.EADDRNOTAVAIL:
                    raise PortUnavailable(
                        f"cannot listen on {shown}: {host} is not an address of this "
                        "machine; check --host"
                    ) from None
                raise PortUnavailable(
                    f"cannot listen on {shown} ({role}): {error.strerror}; {remedy}"
                ) from None


def announce_loading(settings: Settings) -> None:
    """The first line of the start-up, before the policies load (a minute, for a first
    conversion to ONNX)."""
    configure_logging(settings.log_level)
    paths = ", ".join(str(path) for path in settings.policy_paths)
    logger.info("loading the policies in %s", paths)


class Interrupts:
    """Ctrl-Cs until the server serves. Python's own KeyboardInterrupt can be lost: raised
    inside a `__del__` that the garbage collector runs (TensorFlow's, while a policy loads),
    it is only printed, and the start-up went on. Each is recorded here, and the start-up
    stops at its next step; the lost one's printed traceback is dropped."""

    def __init__(self) -> None:
        self.interrupted = False
        self.serving = False
        self._handler: Any = None
        self._hook = sys.unraisablehook

    def __enter__(self) -> Self:
        self._handler = signal.signal(signal.SIGINT, self._on_sigint)
        self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *_: object) -> None:
        signal.signal(signal.SIGINT, self._handler)
        sys.unraisablehook = self._hook

    def record(self) -> None:
        if not self.serving:
            self.interrupted = True

    def check(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    def _on_sigint(self, sig: int, frame: FrameType | None) -> None:
        self.record()
        raise KeyboardInterrupt

    def _unraisable(self, unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            self._hook(unraisable)


def run_uvicorn(app: FastAPI, settings: Settings, interrupts: Interrupts) -> None:
    """Serve `app` until stopped; KeyboardInterrupt when a Ctrl-C came before it served."""
    interrupts.check()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        **uvicorn_options(settings),
    )
    try:
        _Server(config, interrupts).run()
    except KeyboardInterrupt:  # uvicorn raises again the signal it stopped on
        pass
    except SystemExit:  # uvicorn's start-up failure, which an interrupted start-up is too
        if not interrupts.interrupted:
            raise
    interrupts.check()


class _Server(uvicorn.Server):
    """uvicorn's server, which a Ctrl-C before it serves stops without serving."""

    def __init__(self, config: uvicorn.Config, interrupts: Interrupts) -> None:
        super().__init__(config)
        self.interrupts = interrupts
        config.load()
        config.lifespan_class = functools.partial(_Lifespan, server=self)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.interrupts.record()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.interrupts.interrupted:  # while it bound the port: it closes it at once
            self.should_exit = True

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        # From "Uvicorn running on" on, a Ctrl-C is a stop; before it, an interruption.
        if not self.interrupts.interrupted:
            self.interrupts.serving = True
            super()._log_started_message(listeners)
            host, port = self.config.host, listeners[0].getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            logger.info("API documentation on http://%s:%d/docs", shown, port)


class _Lifespan(LifespanOn):
    """The application's start-up, after which an interrupted start-up goes no further:
    the application is shut down and uvicorn exits before it binds the port."""

    def __init__(self, config: uvicorn.Config, server: _Server) -> None:
        super().__init__(config)
        self.server = server

    async def startup(self) -> None:
        await super().startup()
        if self.server.interrupts.interrupted and not self.should_exit:
            await self.shutdown()
            self.should_exit = True


def warn_demo_key(settings: Settings, registry: PolicyRegistry, keys: KeyRing) -> None:
    """Anyone can look the Pathmind demo key up: serving it beyond loopback is serving openly."""
    if _is_loopback(settings.host):
        return
    demo = PATHMIND_DEMO_KEY.encode()
    named = [e.name for e in registry.entries() if demo in (keys.policy_keys(e) or ())]
    if named:
        logger.warning(
            "serving %s on %s with the well-known Pathmind demo API key, which anyone can "
            "use: set your own with --api-key or POLICY_SERVER_API_KEY",
            ", ".join(named),
            settings.host or "every address",
        )
    if keys.admin_key == demo:
        logger.warning(
            "the admin key is the well-known Pathmind demo key, served on %s: set another "
            "with --admin-key or POLICY_SERVER_ADMIN_KEY",
            settings.host or "every address",
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every address)
        return False

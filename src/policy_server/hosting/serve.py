"""`policy-server serve`: one process, or a supervisor of `--workers` processes."""

from __future__ import annotations

from policy_server.hosting.app import build_app
from policy_server.hosting.startup import (
    Interrupts,
    announce_loading,
    check_ports,
    grpc_checked,
    run_uvicorn,
)
from policy_server.hosting.supervisor import serve_workers
from policy_server.settings import Settings


def serve(settings: Settings) -> None:
    """Serve until stopped. PortUnavailable before any policy loads when a port is taken;
    KeyboardInterrupt when a Ctrl-C interrupts the start-up."""
    settings = grpc_checked(settings)
    check_ports(settings)
    announce_loading(settings)
    if settings.resolved_workers > 1:
        serve_workers(settings)
        return
    with Interrupts() as interrupts:
        run_uvicorn(build_app(settings, grpc=True), settings, interrupts)

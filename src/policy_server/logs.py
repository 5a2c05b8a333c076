"""Structured logging: every log record as one JSON line on stdout."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colours
}
# Libraries whose INFO lines narrate their internals rather than the server's work.
_CHATTY = ("tf2onnx", "absl")
access_log = logging.getLogger("policy_server.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {
            k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str) -> None:
    """JSON lines on stdout for our loggers and uvicorn's; uvicorn's access log is replaced
    by `policy_server.access`, which never logs query strings (they may hold the API key)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def log_request(
    request_id: str,
    method: str,
    route: str,
    path: str,
    status: int | str,
    protocol: str,
    answered: tuple[str, str],
    seconds: float,
) -> None:
    """One JSON log line per request, whatever its protocol; callers check first that
    `access_log` is enabled for INFO, so that a server at WARNING builds nothing."""
    access_log.info(
        "request",
        extra={
            "request_id": request_id,
            "method": method,
            "route": route,
            "path": path,
            "status": status,
            "latency_ms": round(seconds * 1000, 3),
            "protocol": protocol,
            "policy": answered[0],
            "version": answered[1],
        },
    )

"""Structured logging: one JSON object a line (orjson), or text."""
from __future__ import annotations

import logging
import sys
import time

import orjson

from gateway.exposure import mask_text

__all__ = ["setup_logging"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return mask_text(orjson.dumps(out, default=str).decode())  # no password in a URL reaches a log


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return mask_text(line)


def setup_logging(level: str = "info", fmt: str = "json", *, prefix: dict | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if prefix:
        handler.addFilter(_Prefix(prefix))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp logs every malformed request with a traceback; make it one line.
    server_log = logging.getLogger("aiohttp.server")
    server_log.filters[:] = [_BadRequestLine()]
    # aiohttp logs non-HTTP garbage at debug level; let it reach the filter, which keeps only that.
    server_log.setLevel(logging.DEBUG)


class _BadRequestLine(logging.Filter):
    """'Error handling request' + traceback -> one warning line naming the peer and the error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Error handling request") and record.exc_info:
            exc = record.exc_info[1]
            record.msg = "bad request rejected: %s"
            record.args = (" ".join(f"{type(exc).__name__}: {exc}".split())[:300],)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
            return True
        return record.levelno > logging.DEBUG or logging.getLogger().isEnabledFor(logging.DEBUG)


class _Prefix(logging.Filter):
    def __init__(self, fields: dict) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.fields.items():
            if not hasattr(record, k):
                setattr(record, k, v)
        return True

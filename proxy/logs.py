"""Log set-up: one structured event per line, as text or JSON.

Session lines carry their fields in ``record.fields`` so the text and JSON formatters render the
same facts. Every value that a peer controls (user name, database, application_name) is escaped
so a client cannot forge log lines with embedded newlines. Payloads and passwords never reach a
log call in the first place.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

FIELDS_ATTR: Final = "fields"
EVENT_ATTR: Final = "event"


def log_event(
    logger: logging.Logger, level: int, event: str, message: str, **fields: object
) -> None:
    """Log ``message`` with machine-readable ``fields`` (``None`` values are left out)."""
    if logger.isEnabledFor(level):
        clean = {k: v for k, v in fields.items() if v is not None}
        logger.log(level, message, extra={EVENT_ATTR: event, FIELDS_ATTR: clean})


def _text_value(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=True)
    return text


class TextFormatter(logging.Formatter):
    """``2026-12-04T21:30:00.123Z INFO session closed id=7 user=app bytes_up=812``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{ts}.{int(record.msecs):03d}Z", record.levelname, record.getMessage()]
        fields: Mapping[str, Any] = getattr(record, FIELDS_ATTR, {})
        parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; field names are stable and documented in the README."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event = getattr(record, EVENT_ATTR, None)
        if event:
            doc["event"] = event
        fields: Mapping[str, Any] = getattr(record, FIELDS_ATTR, {})
        for key, value in fields.items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure_logging(fmt: str, level: str, *, stream: Any = None) -> None:
    """Route the ``proxy`` loggers to stderr (containers collect it) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("proxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # asyncio reports unexpected transport errors on its own logger; keep them visible.
    aio = logging.getLogger("asyncio")
    aio.handlers[:] = [handler]
    aio.setLevel(logging.WARNING)
    aio.propagate = False

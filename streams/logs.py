"""The worker's logging: text or one JSON object per line, and a filter for the client libraries' repeats.

Both worker processes (Faust's and the step process) configure logging with :func:`logging_config`.
"""

from __future__ import annotations

import logging

import orjson

from streams.settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class RepeatFilter(logging.Filter):
    """Lets one record of each (logger, message template) through per ``interval`` seconds, and says how many it
    held back: while a broker is down, aiokafka logs every failed connect, fetch and metadata request, some ten lines
    a second."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self.last: dict[tuple[str, object], tuple[float, int]] = {}  # -> (when let through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        seen = self.last.get(key)
        if seen is not None and record.created - seen[0] < self.interval:
            self.last[key] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({seen[1]} more like it in the last {record.created - seen[0]:.0f}s)"
        self.last[key] = (record.created, 0)
        return True


def logging_config(settings: Settings) -> dict:
    formatter = (
        {"()": JsonFormatter}
        if settings.log_format == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "filters": {"repeats": {"()": RepeatFilter}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"},
            "clients": {
                "class": "logging.StreamHandler",
                "formatter": "main",
                "stream": "ext://sys.stderr",
                "filters": ["repeats"],
            },
        },
        "root": {"level": settings.log_level, "handlers": ["stderr"]},
        "loggers": {
            name: {"level": "WARNING", "handlers": ["clients"], "propagate": False} for name in ("aiokafka", "kafka")
        },
    }

"""The worker's log filter for client libraries: one line per message template per interval, the rest counted."""

from __future__ import annotations

import logging

from streams.logs import RepeatFilter


def _record(msg: str, created: float, name: str = "aiokafka") -> logging.LogRecord:
    record = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("node 1",), None)
    record.created = created
    return record


def test_repeats_are_held_back_and_counted() -> None:
    f = RepeatFilter(interval=10.0)
    assert f.filter(_record("Unable connect to %s", 100.0))
    assert not any(f.filter(_record("Unable connect to %s", 100.0 + i / 10)) for i in range(1, 50))
    assert f.filter(_record("Other message %s", 101.0))  # another template is not held back
    assert f.filter(_record("Unable connect to %s", 100.0, name="aiokafka.consumer"))  # nor another logger
    again = _record("Unable connect to %s", 110.5)
    assert f.filter(again)
    assert again.getMessage() == "Unable connect to node 1 (49 more like it in the last 10s)"
    assert not f.filter(_record("Unable connect to %s", 111.0))

"""The guard that makes aiokafka (and so Faust) skip record batches no codec can decode instead of raising: a
batch compressed with a codec that is not installed, or damaged bytes with a matching CRC, would otherwise fail every
fetch of its partition and crash-loop the worker."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


OnSkip = Callable[[str, int, int, int, Exception], None]  # (topic, partition, first offset, last offset, error)
UNDECODABLE_RETRIES = 3  # fetches of the same batch before it is skipped (one bad fetch is worth a retry)


class _CheckedBatch:
    """A record batch already decoded (decompressed, parsed, CRC checked) by :class:`_CheckedRecords`: it iterates
    the decoded records and answers everything else from the batch itself."""

    def __init__(self, batch: Any, records: list) -> None:
        self._batch = batch
        self._decoded = records

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __iter__(self) -> Iterator:
        return iter(self._decoded)

    def validate_crc(self) -> bool:
        return True  # checked before decoding


class _CheckedRecords:
    """Wraps the ``MemoryRecords`` of one fetched partition: each batch is decoded before aiokafka's fetcher sees it.

    A batch that fails (an unknown or broken codec, a bad CRC, a record that does not parse) is refetched up to
    :data:`UNDECODABLE_RETRIES` times (the batches before it are handed over as usual), then skipped: the position
    moves past it, ``on_skip`` is told, and the partition goes on. Without this, the error would end Faust's consumer
    and meet the same batch again after every restart.
    """

    def __init__(self, records: Any, owner: Any, on_skip: OnSkip, failures: dict) -> None:
        self._records = records
        self._owner = owner  # the PartitionRecords, whose next_fetch_offset a skip moves
        self._on_skip = on_skip
        self._failures = failures
        self._next: _CheckedBatch | None = None
        self._stopped = False

    def has_next(self) -> bool:
        while self._next is None and not self._stopped and self._records.has_next():
            batch = self._records.next_batch()
            if batch is None:
                break
            try:
                if self._owner._check_crcs and not batch.validate_crc():
                    raise ValueError("CRC mismatch")
                self._next = _CheckedBatch(batch, list(batch))
                if self._failures:  # it had failed before: forget that
                    self._failures.pop((self._owner._tp, batch.base_offset), None)
            except Exception as exc:  # any decoding failure: this batch cannot be handed over
                self._failed(batch, exc)
        return self._next is not None

    def next_batch(self) -> _CheckedBatch | None:
        batch, self._next = self._next, None
        return batch

    def _failed(self, batch: Any, exc: Exception) -> None:
        tp = self._owner._tp
        key = (tp, batch.base_offset)
        self._failures[key] = tries = self._failures.get(key, 0) + 1
        if tries < UNDECODABLE_RETRIES:
            self._stopped = True  # hand over what came before; the next fetch starts at this batch again
            return
        del self._failures[key]
        self._owner.next_fetch_offset = batch.next_offset  # past it, even if no batch follows in this fetch
        self._on_skip(tp.topic, tp.partition, batch.base_offset, batch.next_offset - 1, exc)


def skip_undecodable_batches(on_skip: OnSkip) -> None:
    """Make every aiokafka consumer (Faust's included) skip record batches it cannot decode, after a few fetches,
    instead of raising: ``on_skip(topic, partition, first_offset, last_offset, error)`` is called for each.

    aiokafka decodes a fetched partition in ``PartitionRecords``, reading batches from its ``_records``; the wrapper
    goes there, so nothing else of the fetcher changes. ``tests/streams/runtime/test_guard.py`` fails if an aiokafka
    upgrade moves these names.
    """
    from aiokafka.consumer import fetcher

    cls = fetcher.PartitionRecords
    original_init = getattr(cls, "_interest_original_init", cls.__init__)
    failures: dict = {}

    def __init__(self: Any, tp: Any, records: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, tp, records, *args, **kwargs)
        self._records = _CheckedRecords(records, self, on_skip, failures)

    cls._interest_original_init = original_init
    cls.__init__ = __init__

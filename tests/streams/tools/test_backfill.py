"""The backfill's block stepping against the offline replay (pure logic: no broker, no Redis)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from export.runtime import StepSession, replay_log
from streams.core.processor import decoder_for
from streams.tools import blocks
from streams.tools.backfill import parse_partitions
from streams.tools.blocks import Builder
from tests.harness import ml_events


# one block; many blocks that split users' histories, the state arrays growing while a block is being stepped
@pytest.mark.parametrize(("chunk", "rows"), [(100_000, 1024), (777, 8)])
def test_blocks_equal_the_offline_replay_and_duplicates_are_skipped(
    trained_model, data_dir, settings_for, monkeypatch, chunk, rows
):
    monkeypatch.setattr(blocks, "CHUNK_EVENTS", chunk)
    monkeypatch.setattr(blocks, "INITIAL_USERS", rows)
    settings = settings_for()
    session = StepSession(trained_model, device="cpu")
    decoder = decoder_for(session, settings, session.load_catalog())
    events = ml_events(data_dir, 6000)
    builder = Builder(session, settings)
    log = []
    applied = 0
    for offset, ev in enumerate(events):
        click = decoder.decode(orjson.dumps(ev))
        log.append((click.user_id, click.categories, click.action, click.ts))
        applied += builder.add(click, "clicks:0", offset)
    # a redelivery (same offset) and a re-send (new offset, same event id) are both skipped
    again = decoder.decode(orjson.dumps(events[10]))
    assert not builder.add(again, "clicks:0", 10) and not builder.add(again, "clicks:0", 10_000)
    builder.step()
    assert applied == len(events)
    expected = replay_log(session, log)
    writes, states = builder.writes(session.meta.version, lambda u: f"k:{u}", 5, list(session.meta.categories))
    assert {w.key for w in writes} == {f"k:{u}" for u in expected}
    for w in writes:
        u = w.key[2:]
        want = expected[u]
        assert w.events == want.n_events
        assert np.max(np.abs(np.asarray(orjson.loads(w.fields["probs"])) - want.probs)) <= 1e-5
        assert np.max(np.abs(states[u].h - want.h)) <= 1e-5


def test_partitions_option():
    assert parse_partitions(None, 4) == [0, 1, 2, 3]
    assert parse_partitions("0,2-3", 4) == [0, 2, 3]
    for bad in ("4", "x", "1-9"):
        with pytest.raises(Exception, match="--partitions"):
            parse_partitions(bad, 4)

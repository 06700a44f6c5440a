"""The replay oracle: replay the event log offline through the same ONNX model and compare with Redis.

    interest-stream verify --dataset movielens-100k --data ../shared/data/ml-100k \
        --model artifacts/models/movielens-100k/model.onnx

Rebuilds exactly the stream that ``interest-stream replay`` produces (same --limit/--loops/--users), validates each
event with the worker's own decoder (events the worker dead-letters are left out here too), steps every user's
events in order from the learned initial state, and compares per user: max |dp| between the offline distribution
and Redis's ``probs``, and the applied-event count. Exits 1 on any missing user, wrong count or |dp| > --tolerance.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from export.runtime import StepSession, max_abs_diff, replay_log, worst
from streams.core.events import Rejected, encode_event
from streams.core.processor import decoder_for
from streams.core.state import fingerprint_in, user_key, version_tag
from streams.settings import Settings

TOLERANCE = 1e-5


@dataclass
class VerifyReport:
    """What the oracle found."""

    users: int = 0  # users expected in Redis
    events: int = 0  # events expected applied
    rejected: int = 0  # events of the log the worker's validation rejects (not expected in Redis)
    max_dp: float = 0.0  # max over users of max |dp|
    missing: list[str] = field(default_factory=list)  # expected users without a distribution in Redis
    wrong_count: list[tuple[str, int, int]] = field(default_factory=list)  # (user, expected, stored)
    mismatched: list[tuple[str, float]] = field(default_factory=list)  # (user, max |dp|) above tolerance
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        return not (self.missing or self.wrong_count or self.mismatched)

    def summary(self) -> str:
        head = "OK" if self.ok else "MISMATCH"
        return (
            f"{head}: {self.users} users, {self.events} events ({self.rejected} rejected by validation); "
            f"max |dp| = {self.max_dp:.2e} (tolerance {self.tolerance:.0e}); missing users: {len(self.missing)}; "
            f"wrong event counts: {len(self.wrong_count)}; users above tolerance: {len(self.mismatched)}"
        )


def verify_events(
    events: Iterable[dict[str, object] | bytes],
    session: StepSession,
    settings: Settings,
    client,
    catalog: dict[str, tuple[int, ...]] | None = None,
    tolerance: float = TOLERANCE,
) -> VerifyReport:
    """Judge what Redis holds against an offline replay of ``events`` (dicts or raw JSON bytes, in produce order).

    Re-sends count once under the worker's own rule: an event whose fingerprint (its ``event_id``, else its bytes) is
    among the user's last ``settings.dedup_window`` applied ones is skipped.
    """
    catalog = session.load_catalog(settings.catalog_path) if catalog is None else catalog
    decoder = decoder_for(session, settings, catalog)
    report = VerifyReport(tolerance=tolerance)
    log: list[tuple[str, tuple[int, ...], int, float]] = []
    recent: dict[str, bytes] = {}  # per user, the fingerprints of the last dedup_window applied events
    window = 8 * settings.dedup_window
    for ev in events:
        raw = ev if isinstance(ev, bytes) else encode_event(ev)
        try:
            click = decoder.decode(raw)
        except Rejected:
            report.rejected += 1
            continue
        mine = recent.get(click.user_id, b"")
        if fingerprint_in(mine, click.fingerprint):
            continue
        recent[click.user_id] = (mine + click.fingerprint)[-window:]
        log.append((click.user_id, click.categories, click.action, click.ts))
    expected = replay_log(session, log)
    report.users = len(expected)
    report.events = len(log)
    users = list(expected)
    tag = version_tag(session.meta.version)  # judges this model version's states, promoted or not
    pipe = client.pipeline(transaction=False)
    for u in users:
        pipe.hmget(user_key(settings.redis_prefix, tag, u), ("probs", "events"))
    stored = pipe.execute()
    for u, (probs, events_stored) in zip(users, stored, strict=True):
        want = expected[u]
        if probs is None:
            report.missing.append(u)
            continue
        if int(events_stored or 0) != want.n_events:
            report.wrong_count.append((u, want.n_events, int(events_stored or 0)))
        dp = max_abs_diff(np.asarray(orjson.loads(probs), dtype=np.float64), want.probs)  # NaN counts as inf
        report.max_dp = worst(report.max_dp, dp)
        if not dp <= tolerance:
            report.mismatched.append((u, dp))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from streams.tools.replay import add_source_arguments

    add_source_arguments(parser)
    parser.add_argument("--model", type=Path, help="ONNX model (default INTEREST_MODEL_PATH)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest accepted |dp| (default 1e-5)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    import redis

    from models.data import load_dataset
    from models.errors import ServiceError
    from streams.core.state import sync_client
    from streams.settings import load_settings, redact_url
    from streams.tools.replay import wire_events

    settings = load_settings(**({"model_path": args.model} if args.model else {}))
    session = StepSession(settings.model_path, device="cpu")
    ds = load_dataset(args.dataset, args.data, args.items)
    client = None
    try:
        client = sync_client(settings)  # a cluster client connects here already
        report = verify_events(
            wire_events(ds, args.limit, args.loops, args.users), session, settings, client, tolerance=args.tolerance
        )
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:  # one clear line, password masked
        cause = exc.__cause__ if isinstance(exc, redis.exceptions.RedisClusterException) and exc.__cause__ else exc
        raise ServiceError(
            f"cannot read Redis at {redact_url(settings.redis_url)}: {type(cause).__name__}: {exc}"
        ) from None
    finally:
        if client is not None:
            client.close()
    print(report.summary())
    for u, want, got in report.wrong_count[:5]:
        print(f"  user {u}: expected {want} events applied, Redis says {got}")
    for u, dp in sorted(report.mismatched, key=lambda x: -x[1])[:5]:
        print(f"  user {u}: max |dp| {dp:.2e}")
    if report.missing[:5]:
        print(f"  missing users (first 5): {', '.join(report.missing[:5])}")
    if args.json:
        args.json.write_text(orjson.dumps(report.__dict__ | {"ok": report.ok}).decode())
    return 0 if report.ok else 1

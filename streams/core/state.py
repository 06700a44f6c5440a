"""Per-user state and published distribution, together in one Redis hash per user and model version.

Keys (the layout the README documents for other services; this module is the one place that builds them):

- ``<prefix><tag>:<user_id>``: a user's hash under one model version, ``<tag>`` = :func:`version_tag` of the version;
- ``<prefix>promoted``: a string, the version readers see (:func:`promoted_key`);
- ``<prefix>versions``: a hash, version -> JSON of its tag, times, model path and group (:func:`versions_key`).

User ids never contain ':', so no user's key can be the pointer or the registry. The worker writes every field of a
user in one ``HSET`` inside a Lua script that refuses to go backwards (fewer applied events than stored, same model
version); one script call writes up to 256 users, and a batch's calls go out in one pipeline (reads likewise, through
a script of ``HMGET``s; on a Redis Cluster one call per hash slot and one round trip per master,
:mod:`streams.core.routing`). A new owner of a partition just reads the hashes it needs (no changelog restore).

| field           | what                                                                         |
|-----------------|------------------------------------------------------------------------------|
| `probs`         | JSON list, probability per category (model order)                            |
| `top`           | JSON list of `{"category", "p"}`, the top_n categories                       |
| `event_ts`      | last applied event's time, epoch seconds                                     |
| `updated_at`    | when it was written, epoch seconds                                           |
| `model_version` | version of the model that produced the state                                 |
| `events`        | number of events applied to this user                                        |
| `state`         | recurrent state, float32 little-endian `h` then `c` (2 x hidden_size x 4 B)  |
| `pos`           | JSON `{"topic:partition": offset}`: last applied input position per source   |
| `recent`        | 8-byte fingerprints of the last `dedup_window` applied events, concatenated  |

One module (~430 lines) because the key layout, the Lua scripts and the store that runs them change together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import numpy as np
import orjson
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    DataError,
    NoPermissionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.errors import ServiceError
from streams.core.routing import ClusterRouter, chunks, send_pooled, slot_groups
from streams.settings import Settings, redact_url

log = logging.getLogger(__name__)

STATE_FIELDS = ("model_version", "events", "event_ts", "state", "pos", "recent")
# every field of a user's hash, in the order the write script receives the values
WRITE_FIELDS = ("probs", "top", "model_version", "updated_at", "events", "event_ts", "state", "pos", "recent")
SCRIPT_KEYS = 256  # users per script call (a batch's calls go out in one pipeline)

# KEYS = user keys; ARGV = model_version, ttl_s, state bytes, F, F field names, then per key: events, F values.
# Per key, refuses to write over a valid state of the same model version with at least as many applied events: never
# older over newer. Valid as decode_state sees it: `events` a count, `state` of the right size. Anything else under
# the key (another version, a damaged hash, not a hash at all) is overwritten. Returns 1 (written) or 0 (refused).
CAS_WRITE = """
local version, ttl, slen, nf = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out, hset = {}, {}
for i, key in ipairs(KEYS) do
  local at = 4 + nf + (i - 1) * (nf + 1)
  local cur = redis.pcall('HMGET', key, 'model_version', 'events')
  if cur.err then redis.call('DEL', key); cur = {} end
  local n = cur[2] and string.match(cur[2], '^%d+$') and tonumber(cur[2])
  if cur[1] == version and n and n >= tonumber(ARGV[at + 1]) and redis.call('HSTRLEN', key, 'state') == slen then
    out[i] = 0
  else
    for j = 1, nf do hset[2 * j - 1] = ARGV[4 + j]; hset[2 * j] = ARGV[at + 1 + j] end
    redis.call('HSET', key, unpack(hset))
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
    out[i] = 1
  end
end
return out
"""

# KEYS = user keys; ARGV = field names. The fields of every key, one reply ({"WRONGTYPE"} for a key not a hash).
READ_STATES = """
local out = {}
for i, key in ipairs(KEYS) do
  local row = redis.pcall('HMGET', key, unpack(ARGV))
  if row.err then row = {'WRONGTYPE'} end
  out[i] = row
end
return out
"""


def sha1_hex(script: str) -> str:
    """The SHA1 that EVALSHA names ``script`` by."""
    return hashlib.sha1(script.encode()).hexdigest()


@dataclass(slots=True)
class UserState:
    """What the worker keeps per user between events."""

    h: np.ndarray  # (H,) float32
    c: np.ndarray  # (H,) float32
    events: int = 0  # events applied so far
    last_ts: float = float("nan")  # time of the last applied event (nan: none yet)
    positions: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> last applied offset
    recent: bytes = b""  # fingerprints of the last applied events (8 bytes each, oldest first)

    def seen(self, fingerprint: bytes) -> bool:
        """True if ``fingerprint`` is among the recent ones."""
        return fingerprint_in(self.recent, fingerprint)


def fingerprint_in(recent: bytes, fingerprint: bytes) -> bool:
    """True if the 8-byte ``fingerprint`` is one of ``recent``'s (an 8-byte aligned match, searched in C)."""
    i = recent.find(fingerprint)
    while i != -1:
        if i % 8 == 0:
            return True
        i = recent.find(fingerprint, i + 1)
    return False


@dataclass(slots=True)
class UserWrite:
    """One user's new published distribution and state, written in one HSET."""

    key: str
    fields: dict[str, bytes | str | int | float]
    events: int


def encode_state(st: UserState, state: bytes | None = None) -> dict[str, bytes | str | int | float]:
    """A user's stored fields but the published ones; ``state``: h then c as little-endian float32, when the caller
    has them already (a batch's users cut from one buffer)."""
    return {
        "events": st.events,
        "event_ts": repr(st.last_ts),
        "state": state if state is not None else st.h.astype("<f4").tobytes() + st.c.astype("<f4").tobytes(),
        "pos": orjson.dumps(st.positions),
        "recent": st.recent,
    }


def decode_state(values: Sequence[bytes | None], version: str, hidden: int) -> tuple[UserState | None, str]:
    """A stored row (HMGET order of STATE_FIELDS) -> (state, problem). The state is None when there is none of this
    model version (absent, or another model's: the user restarts from the cold-start state) or when it is damaged;
    ``problem`` says what was damaged ("" when nothing), so that the caller can log it. The same validity test as
    CAS_WRITE's: a damaged state is overwritten by the next write, a valid one only by a newer one."""
    if len(values) != len(STATE_FIELDS):
        return None, "the key holds no hash"
    stored_version, events, event_ts, blob, pos, recent = values
    if stored_version != version.encode():
        return None, ""
    if events is None or not events.isdigit():
        return None, f"events is {events!r}, not a count"
    if blob is None or len(blob) != 8 * hidden:
        return None, f"state has {0 if blob is None else len(blob)} bytes, not {8 * hidden}"
    arr = np.frombuffer(blob, dtype="<f4")
    st = UserState(h=arr[:hidden].astype(np.float32), c=arr[hidden:].astype(np.float32), events=int(events))
    problems = []  # damaged bookkeeping: keep the state, drop what cannot be read
    try:
        st.last_ts = float(event_ts) if event_ts else float("nan")
    except ValueError:
        problems.append("event_ts")
    try:
        positions = orjson.loads(pos) if pos else {}
        if not isinstance(positions, dict) or not all(isinstance(v, int) for v in positions.values()):
            raise ValueError
        st.positions = positions
    except ValueError:
        problems.append("pos")
    if recent and len(recent) % 8:
        problems.append("recent")
    else:
        st.recent = recent or b""
    return st, f"unreadable {', '.join(problems)} (dropped)" if problems else ""


def startup_failure(
    settings: Settings, exc: RedisError | RedisClusterException, deadline: float
) -> ServiceError | None:
    """Whether a failed PING at start-up is final: a refused login or a missing permission will not fix itself, so
    at once; anything else (Redis still starting, a network blip) once ``deadline`` (monotonic) has passed. The
    error names the URL with its password masked; None means: retry."""
    # a cluster client wraps what the nodes answered (a refused login too) in a RedisClusterException
    cause = exc.__cause__ if isinstance(exc, RedisClusterException) and exc.__cause__ else exc
    denied = isinstance(cause, AuthenticationError | NoPermissionError)
    if denied or time.monotonic() > deadline:
        return ServiceError(f"cannot reach Redis at {redact_url(settings.redis_url)}: {type(exc).__name__}: {exc}")
    return None


def version_tag(version: str) -> str:
    """A short stable id of a model version for key and topic names: 8 hex characters of its BLAKE2b hash (versions
    are free text; the tag is safe in a Redis key, a Kafka topic name and a consumer group id)."""
    return hashlib.blake2b(version.encode(), digest_size=4).hexdigest()


def user_key(prefix: str, tag: str, user_id: str) -> str:
    """The one place that builds a user's Redis key: ``<prefix><tag>:<user_id>`` (the layout the README documents;
    user ids are validated before they get here)."""
    return f"{prefix}{tag}:{user_id}"


def promoted_key(prefix: str) -> str:
    """The pointer readers follow: a string holding the promoted model version."""
    return prefix + "promoted"


def versions_key(prefix: str) -> str:
    """The registry of versions: a hash, version -> JSON (tag, registered/promoted times, model path, group)."""
    return prefix + "versions"


def redis_options(settings: Settings) -> dict[str, Any]:
    """Client options from the settings: timeouts, optional ACL user/password override, TLS CA."""
    opts: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
    if settings.redis_username:
        opts["username"] = settings.redis_username
    if settings.redis_password is not None:
        opts["password"] = settings.redis_password.get_secret_value()
    if settings.redis_ssl_ca_certs and settings.redis_url.startswith("rediss://"):
        opts["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    return opts


class _HiredisPacking:
    """Packs commands with hiredis (in C), as redis-py's sync connection does when hiredis is installed; its asyncio
    connection packs them in Python, ~2 us an argument (a user's CAS write has two dozen)."""

    def pack_command(self, *args):
        if isinstance(args[0], str):  # a multi-word command name ("SCRIPT LOAD") goes out as separate words
            args = (*args[0].encode().split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from None


class _Connection(_HiredisPacking, aioredis.Connection):
    pass


class _SSLConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


def redis_client(settings: Settings) -> aioredis.Redis | aioredis.RedisCluster:
    """An asyncio Redis client from the settings, without redis-py's own retries (10 by default, with backoff):
    the StateStore retries itself, counted in ``interest_redis_retries_total`` and logged. Replies are parsed and
    commands packed by hiredis. With ``redis_cluster``, a cluster client that finds every node from the URL's one
    (the store sends its script calls itself, :mod:`streams.core.routing`)."""
    if settings.redis_cluster:
        return aioredis.RedisCluster.from_url(settings.redis_url, **redis_options(settings))
    scheme = settings.redis_url.split("://", 1)[0]
    packing: dict[str, dict[str, Any]] = {
        "redis": {"connection_class": _Connection},
        "rediss": {"connection_class": _SSLConnection},
    }
    return aioredis.Redis.from_url(
        settings.redis_url,
        health_check_interval=10,
        retry=Retry(NoBackoff(), 0),
        **packing.get(scheme, {}),  # unix:// keeps redis-py's own
        **redis_options(settings),
    )


class StateStore:
    """The Redis side of the worker: reads states, writes a batch of users through one pipeline.

    Like a Quix Streams sink: it connects and pings at start, writes one pipeline per batch, logs count and elapsed
    time, and retries with backoff (forever, up to ``redis_retry_max_s`` between tries) while Redis is unreachable.
    A bounded in-process cache of states avoids a read per batch; it is dropped on partition revocation.
    """

    def __init__(self, settings: Settings, model_version: str, hidden: int, metrics=None) -> None:
        self.settings = settings
        self.prefix = settings.redis_prefix
        self.version = model_version
        self.tag = version_tag(model_version)
        self.hidden = hidden
        self.ttl = settings.redis_ttl_s
        self.metrics = metrics
        self.client = redis_client(settings)
        self.cache: OrderedDict[str, UserState] = OrderedDict()
        self.cache_size = settings.cache_size
        self._write_sha = sha1_hex(CAS_WRITE)
        self._read_sha = sha1_hex(READ_STATES)
        self.wait = settings.redis_wait_replicas
        self.router: ClusterRouter | None = None
        if settings.redis_cluster:
            self.router = ClusterRouter(
                self.client,  # type: ignore[arg-type]  # a RedisCluster in cluster mode
                (CAS_WRITE, READ_STATES),
                self.wait,
                settings.redis_wait_timeout_ms,
                settings.redis_retry_max_s,
                self._count_retry,
            )
        self.stale_writes = 0
        self.corrupt_states = 0  # damaged states read (logged; see decode_state)

    def key(self, user_id: str) -> str:
        return user_key(self.prefix, self.tag, user_id)

    async def promoted(self) -> str | None:
        """The promoted version (the pointer readers follow), or None when none is."""
        value = await self._retrying("pointer read", lambda: self.client.get(promoted_key(self.prefix)))
        return value.decode() if value is not None else None

    async def start(self, timeout: float = 30.0) -> None:
        """Connect and PING, retrying as :func:`startup_failure` says; raise its ServiceError when it gives up."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.client.ping()
                await self.load_scripts()
                log.info("redis connected: %s", redact_url(self.settings.redis_url))
                return
            except (RedisError, RedisClusterException) as exc:
                failure = startup_failure(self.settings, exc, deadline)
                if failure is not None:
                    raise failure from None
                await asyncio.sleep(0.5)

    async def load_scripts(self) -> None:
        """SCRIPT LOAD the read and write scripts (again after a Redis restart: NOSCRIPT); on every master of a
        cluster."""
        if self.router is not None:
            await self.router.load_scripts()
            return
        await self.client.script_load(CAS_WRITE)
        await self.client.script_load(READ_STATES)

    def _count_retry(self) -> None:
        if self.metrics:
            self.metrics.redis_retries.inc()

    async def _wait_short(self, acked: int) -> None:
        """A WAIT came back short of ``redis_wait_replicas``: not an ack; count, log, back off, WAIT again."""
        self._count_retry()
        log.warning("redis WAIT: %s of %d replicas acknowledged; waiting again", acked, self.wait)
        await asyncio.sleep(0.05)

    def _groups(self, keys: Sequence[str]) -> list[list[int]]:
        """Which keys share a script call: any 256 on one Redis; only keys of one hash slot on a cluster."""
        if self.router is not None:
            return slot_groups(keys, SCRIPT_KEYS)
        return chunks(len(keys), SCRIPT_KEYS)

    async def _scripts(
        self, what: str, calls: Sequence[tuple[str, list[str], Sequence[Any]]], write: bool = False
    ) -> list:
        """Run script calls ``(sha, keys, args)`` in one pipeline (one per master of a cluster), retrying while Redis
        is unreachable and loading the scripts once if Redis lost them; returns the replies, in order. A write is
        done once ``redis_wait_replicas`` replicas have it (``WAIT`` on the connection that sent it)."""
        router = self.router
        held = write and self.wait > 0

        async def send():
            if router is not None:
                return await router.send(calls, write)
            if held:
                timeout = self.settings.redis_wait_timeout_ms
                return await send_pooled(self.client, calls, self.wait, timeout, self._wait_short)
            pipe = self.client.pipeline(transaction=False)
            for sha, keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)

        results = await self._retrying(what, send)
        if any(isinstance(r, NoScriptError) for r in results):  # Redis restarted: load the scripts, send again
            await self._retrying("script load", self.load_scripts)
            results = await self._retrying(what, send)
        bad = [r for r in results if isinstance(r, Exception)]
        if bad:
            raise ServiceError(f"redis rejected a {what}: {bad[0]}")
        return results

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()

    def drop_cache(self, users: Iterable[str] | None = None) -> None:
        """Forget cached states (all, or those of ``users``): the next batch reads them from Redis."""
        if users is None:
            self.cache.clear()
        else:
            for u in users:
                self.cache.pop(u, None)

    async def _retrying(self, what: str, op):
        delay = 0.1
        while True:
            try:
                return await op()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self.metrics:
                    self.metrics.redis_retries.inc()
                log.warning("redis %s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.redis_retry_max_s)

    async def load(self, users: Iterable[str]) -> dict[str, UserState | None]:
        """States of ``users`` (None for a user with no usable state): cache first, then the read script."""
        out: dict[str, UserState | None] = {}
        missing: list[str] = []
        cache = self.cache
        for u in users:
            st = cache.get(u)
            if st is None:
                missing.append(u)
            else:
                out[u] = st
        if missing:
            keys = [self.key(u) for u in missing]
            groups = self._groups(keys)
            calls = [(self._read_sha, [keys[i] for i in g], STATE_FIELDS) for g in groups]
            rows: list[Any] = [None] * len(missing)
            for g, reply in zip(groups, await self._scripts("read", calls), strict=True):
                for i, row in zip(g, reply, strict=True):
                    rows[i] = row
            for u, row in zip(missing, rows, strict=True):
                out[u], problem = decode_state(row, self.version, self.hidden)
                if problem:
                    self.corrupt_states += 1
                    if self.metrics:
                        self.metrics.corrupt_states.inc()
                    fix = "kept, overwritten by the next write" if out[u] else "restarts cold, overwritten"
                    log.warning("user %r: damaged state in Redis: %s; %s", u, problem, fix)
        return out

    async def write(self, writes: Sequence[UserWrite], states: dict[str, UserState]) -> int:
        """Write a batch (CAS script calls of up to SCRIPT_KEYS users, one pipeline); cache what was written. Returns
        the number of stale writes."""
        if not writes:
            return 0
        t0 = time.perf_counter()
        head = [self.version, self.ttl, 8 * self.hidden, len(WRITE_FIELDS), *WRITE_FIELDS]
        groups = self._groups([w.key for w in writes])
        calls = []
        for g in groups:
            chunk = [writes[i] for i in g]
            args = list(head)
            for w in chunk:
                fields = w.fields
                args.append(w.events)
                args.extend([fields[f] for f in WRITE_FIELDS])
            calls.append((self._write_sha, [w.key for w in chunk], args))
        results: list[Any] = [0] * len(writes)
        for g, reply in zip(groups, await self._scripts("write", calls, write=True), strict=True):
            for i, ok in zip(g, reply, strict=True):
                results[i] = ok
        stale = 0
        cache = self.cache
        prefix_len = len(self.key(""))
        for w, ok in zip(writes, results, strict=True):
            user = w.key[prefix_len:]
            if ok:
                cache.pop(user, None)
                cache[user] = states[user]
            else:  # another worker is ahead of us for this user: forget ours, read theirs next time
                stale += 1
                cache.pop(user, None)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        self.stale_writes += stale
        elapsed = time.perf_counter() - t0
        if self.metrics:
            self.metrics.redis_write_seconds.observe(elapsed)
            if stale:
                self.metrics.stale_writes.inc(stale)
        log.debug("redis wrote %d users in %.1f ms (%d stale)", len(writes), elapsed * 1e3, stale)
        return stale


def sync_client(settings: Settings) -> redis.Redis:
    """A blocking Redis client from the settings (same options as the worker's); a cluster client (routing every
    command by its key's slot, following MOVED/ASK) with ``redis_cluster``. Connecting to a cluster reads its slot
    map at once, so this can raise a RedisError (or RedisClusterException) itself."""
    if settings.redis_cluster:
        return redis.RedisCluster.from_url(settings.redis_url, **redis_options(settings))  # type: ignore[return-value]
    return redis.Redis.from_url(settings.redis_url, **redis_options(settings))

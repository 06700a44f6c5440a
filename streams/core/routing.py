"""Where a batch's script calls go, and ``WAIT``: one Redis, or the masters of a Redis Cluster by hash slot.

Every script call the store makes in cluster mode holds keys of one hash slot (:func:`slot_groups`), so it runs on
that slot's master. :class:`ClusterRouter` sends each master its calls in one round trip on one connection, then, with
``INTEREST_REDIS_WAIT_REPLICAS=N``, a ``WAIT N timeout`` on that same connection: Redis counts the replicas that have
this connection's writes, so the ``WAIT`` must follow them on the connection that sent them (a pooled pipeline would
not say which one). A ``WAIT`` that comes back short is sent again on the same connection (backing off), never taken
as an ack. Redirections are followed by the call: ``MOVED`` updates the slot map and re-sends to the new owner, ``ASK``
re-sends with ``ASKING`` to the importing node, ``TRYAGAIN``/``CLUSTERDOWN``/a dead node back off and re-send after a
refresh of the slot map. A re-sent write that the CAS script now refuses (it had already landed) keeps the reply of its
first try. :func:`send_held` is the same round for one Redis (used when the worker waits for replicas).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

Call = tuple[str, list[str], Sequence[Any]]  # (script sha, keys, args)
# a node that is down or unreachable, a map being rebuilt: retried after a pause and a refresh of the slot map
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, RedisClusterException)


def slot_groups(keys: Sequence[str], limit: int) -> list[list[int]]:
    """Indexes of ``keys`` grouped by hash slot (``{hash tags}`` honoured, as Redis does), at most ``limit`` a group,
    in first-seen order: one script call per group."""
    by_slot: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        by_slot.setdefault(key_slot(k.encode()), []).append(i)
    return [idx[j : j + limit] for idx in by_slot.values() for j in range(0, len(idx), limit)]


def chunks(n: int, limit: int) -> list[list[int]]:
    """Indexes 0..n-1 in consecutive groups of ``limit`` (one Redis: any keys may share a call)."""
    return [list(range(i, min(i + limit, n))) for i in range(0, n, limit)]


async def _read(conn) -> Any:
    """One reply; an error reply is returned (the stream stays in step), not raised."""
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc


async def send_held(
    conn,
    calls: Sequence[Call],
    wait: int,
    wait_timeout_ms: int,
    on_short: Callable[[int], Any],
    asking: Sequence[bool] = (),
    replies: list[Any] | None = None,
) -> list[Any]:
    """Send ``calls`` as EVALSHAs on ``conn`` in one round trip (each after ``ASKING`` where ``asking`` says so) and
    return their replies (errors as values). With ``wait``, then ``WAIT wait wait_timeout_ms`` on the same connection,
    again until at least ``wait`` replicas have the writes; ``on_short(acked)`` is awaited before each retry (log,
    count, back off). Raises what the connection raises (the caller re-sends); the replies read before that are in
    ``replies`` when given."""
    packed = []
    for i, (sha, keys, args) in enumerate(calls):
        if asking and asking[i]:
            packed.append(hiredis.pack_command(("ASKING",)))
        packed.append(hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args)))
    wait_args: tuple[Any, ...] = ("WAIT", wait, wait_timeout_ms)
    wait_cmd = hiredis.pack_command(wait_args)
    if wait:
        packed.append(wait_cmd)
    await conn.send_packed_command(packed)
    replies = [] if replies is None else replies
    for i in range(len(calls)):
        if asking and asking[i]:
            await _read(conn)  # +OK
        replies.append(await _read(conn))
    if wait:
        acked = await _read(conn)
        while not (isinstance(acked, int) and acked >= wait):
            if isinstance(acked, Exception):  # e.g. the node is a replica now: the caller re-sends elsewhere
                raise acked
            await on_short(acked)
            await conn.send_packed_command([wait_cmd])
            acked = await _read(conn)
    return replies


async def send_pooled(client, calls: Sequence[Call], wait: int, wait_timeout_ms: int, on_short) -> list[Any]:
    """:func:`send_held` on a connection of one Redis's pool (``client``), for the whole round and its WAITs."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        return await send_held(conn, calls, wait, wait_timeout_ms, on_short)
    except BaseException:
        await conn.disconnect()  # replies may be left unread on it
        raise
    finally:
        await pool.release(conn)


class ClusterRouter:
    """Sends script calls (each of one slot) to the masters of a Redis Cluster, following the cluster as it changes."""

    def __init__(
        self,
        client: RedisCluster,
        scripts: Sequence[str],
        wait: int,
        wait_timeout_ms: int,
        retry_max_s: float,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.scripts = tuple(scripts)
        self.wait = wait
        self.wait_timeout_ms = wait_timeout_ms
        self.retry_max_s = retry_max_s
        self.on_retry = on_retry or (lambda: None)

    async def load_scripts(self, nodes: Sequence[ClusterNode] | None = None) -> None:
        """SCRIPT LOAD on every master (or on ``nodes``): a replica promoted by a failover has none of them."""
        await self.client.initialize()
        targets = list(nodes) if nodes is not None else self.client.get_primaries()
        for script in self.scripts:
            await self.client.execute_command("SCRIPT LOAD", script, target_nodes=targets)

    async def _round(
        self, node: ClusterNode, calls: Sequence[Call], asking: Sequence[bool], wait: int
    ) -> tuple[list[Any], BaseException | None]:
        """The node's replies, and what failed before all of them (and the WAIT) were in (None: nothing)."""
        replies: list[Any] = []
        conn = node.acquire_connection()
        try:
            await send_held(conn, calls, wait, self.wait_timeout_ms, self._wait_short(node), asking, replies)
            return replies, None
        except (*TRANSIENT, ResponseError) as exc:
            await conn.disconnect()  # replies may be left unread on it
            return replies, exc
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            node.release(conn)

    def _wait_short(self, node: ClusterNode):
        async def short(acked: int) -> None:
            # the WAIT's own timeout paces the retries: a short pause, so that a replica back is noticed at once
            self.on_retry()
            log.warning(
                "redis WAIT on %s: %s of %d replicas acknowledged within %d ms; waiting again",
                node.name, acked, self.wait, self.wait_timeout_ms,
            )  # fmt: skip
            await asyncio.sleep(0.05)

        return short

    async def _refresh(self) -> None:
        """Reload the slot map from the cluster (after a dead node, CLUSTERDOWN, or a node we do not know)."""
        try:
            self.client._initialize = True  # redis-py's own flag: the next initialize() rebuilds the map
            await self.client.initialize()
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("redis cluster: slot map refresh failed (%s: %s)", type(exc).__name__, exc)

    async def send(self, calls: Sequence[Call], write: bool) -> list[Any]:
        """The replies of ``calls`` in order, every call answered by the master that owns its slot now (with ``WAIT``
        after writes when the settings ask for it). Retries until done, as the store does while Redis is away."""
        client = self.client
        results: list[Any] = [None] * len(calls)
        done = [False] * len(calls)
        todo = list(range(len(calls)))
        ask_to: dict[int, ClusterNode] = {}
        wait = self.wait if write else 0
        delay = 0.05
        while todo:
            try:
                await client.initialize()
                by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
                for i in todo:
                    node = ask_to.get(i) or client.nodes_manager.get_node_from_slot(key_slot(calls[i][1][0].encode()))
                    by_node.setdefault(node.name, (node, []))[1].append(i)
            except TRANSIENT as exc:
                await self._pause(f"slot map ({type(exc).__name__})", delay)
                delay = min(delay * 2, self.retry_max_s)
                await self._refresh()
                continue
            groups = list(by_node.values())
            outcomes = await asyncio.gather(
                *(self._round(node, [calls[i] for i in idx], [i in ask_to for i in idx], wait) for node, idx in groups)
            )
            todo, ask_to = [], {}
            refresh = pause = False
            noscript: list[ClusterNode] = []
            for (node, idx), (out, failed) in zip(groups, outcomes, strict=True):
                if failed is not None:  # not all answered, or not WAITed: every call of the node goes again
                    log.warning("redis cluster node %s: %s: %s; re-sending", node.name, type(failed).__name__, failed)
                    for i, reply in zip(idx, out, strict=False):
                        if not done[i] and not isinstance(reply, Exception):
                            results[i], done[i] = reply, True
                    todo += idx
                    refresh = pause = True
                    continue
                for i, reply in zip(idx, out, strict=True):
                    if isinstance(reply, MovedError):  # the slot has a new owner (reshard or failover)
                        await client.nodes_manager.move_slot(reply)
                        todo.append(i)
                    elif isinstance(reply, AskError):  # the slot is moving; this key is on the importing node
                        target = client.get_node(host=reply.host, port=reply.port)
                        if target is None:
                            refresh = True
                        else:
                            ask_to[i] = target
                        todo.append(i)
                    elif isinstance(reply, (TryAgainError, ClusterDownError)):  # keys of the slot are mid-migration
                        todo.append(i)
                        pause = True
                    elif isinstance(reply, NoScriptError):  # a promoted replica, a restarted node
                        noscript.append(node)
                        todo.append(i)
                    else:
                        if not done[i]:  # a re-send refused as stale after a lost connection keeps the first reply
                            results[i], done[i] = reply, True
                        elif isinstance(reply, Exception):
                            results[i] = reply
            if noscript:
                try:
                    await self.load_scripts(list({n.name: n for n in noscript}.values()))
                except TRANSIENT:
                    refresh = pause = True
            if refresh:
                await self._refresh()
            if todo and pause:
                await self._pause(f"{len(todo)} script calls", delay)
                delay = min(delay * 2, self.retry_max_s)
        return results

    async def _pause(self, what: str, delay: float) -> None:
        self.on_retry()
        log.warning("redis cluster: re-sending %s in %.2fs", what, delay)
        await asyncio.sleep(delay)

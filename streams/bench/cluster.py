"""6. The state tier: the product on a local 3-master Redis Cluster beside the single Redis (same run, same pre-filled
topic), the cost of ``INTEREST_REDIS_WAIT_REPLICAS=1`` on both, and the bytes a user costs, field by field.

* ``cluster_product_eps_1w`` / ``cluster_wait1_product_eps_1w`` / ``wait1_product_eps_1w``: one worker over the same
  events as ``product_eps_1w``, on the cluster (WAIT 0, WAIT 1) and on the single Redis with one replica (WAIT 1);
* ``cluster_redis_pipeline_eps``: ``StateStore.write`` of 2000 users a batch on the cluster (one round trip per
  master, EVALSHA per slot group), beside ``redis_pipeline_eps``;
* ``cluster_latency_ms`` / ``cluster_wait1_latency_ms``: produce -> Redis quantiles at the offered rate of
  ``latency_ms``;
* ``user_bytes``: ``MEMORY USAGE`` (``SAMPLES 0``) of a light user's hash (3 events) and a heavy one's (300 events,
  past the 256-event dedup window), written by the worker's own code on the single Redis, with ``HSTRLEN`` of every
  field and the hash's encoding.
"""

from __future__ import annotations

import asyncio

from streams.bench.common import log
from streams.bench.harness import BenchRun

LIGHT_EVENTS, HEAVY_EVENTS = 3, 300


class ClusterJobs(BenchRun):
    cluster_url: str = ""

    def on_cluster(self, env: dict[str, str], wait: int = 0) -> dict[str, str]:
        """A run's variables pointed at the cluster (db 0 is the only one there; the run's prefix keeps it apart)."""
        return env | self.cluster_vars(wait)

    def cluster_vars(self, wait: int = 0) -> dict[str, str]:
        return {
            "INTEREST_REDIS_URL": self.cluster_url,
            "INTEREST_REDIS_CLUSTER": "true",
            "INTEREST_REDIS_WAIT_REPLICAS": str(wait),
        }

    def cluster_runs(self, topic: str, n: int, ds, rate: float, seconds: float, warmup: int) -> dict:
        product, latency, pipeline = self.product, self.latency, self.redis_pipeline  # type: ignore[attr-defined]
        r = {
            "p1_cluster": product(self.on_cluster(self.names("p1c", topic)), n, 1, "product-1w-cluster"),
            "p1_cluster_wait1": product(self.on_cluster(self.names("p1cw", topic), 1), n, 1, "product-1w-cluster-w1"),
            "p1_wait1": product(
                self.names("p1w", topic) | {"INTEREST_REDIS_WAIT_REPLICAS": "1"}, n, 1, "product-1w-wait1"
            ),
            "redis_cluster": pipeline(self.plan.redis_writes, **self.cluster_vars()),
            "latency_cluster": latency(ds, rate, seconds, warmup, "latc", **self.cluster_vars()),
            "latency_cluster_wait1": latency(ds, rate, seconds, warmup, "latcw", **self.cluster_vars(1)),
        }
        log(
            f"cluster: {r['p1_cluster']['eps']:,.0f} ev/s (WAIT 1: {r['p1_cluster_wait1']['eps']:,.0f}); single Redis "
            f"WAIT 1: {r['p1_wait1']['eps']:,.0f} ev/s; cluster pipeline {r['redis_cluster']['eps']:,.0f} writes/s"
        )
        return r

    def user_bytes(self, **env_extra: str) -> dict:
        """Bytes of a light and a heavy user's hash, as the worker writes them, with each field's length."""
        import orjson
        import redis

        from export.runtime import StepSession
        from streams.core.processor import InterestProcessor, RawMessage
        from streams.core.state import WRITE_FIELDS, StateStore, user_key, version_tag

        env = self.names("bytes") | env_extra
        settings = self.settings(env)
        session = StepSession(self.model, device="cpu")
        catalog = session.load_catalog(settings.catalog_path)
        items = list(catalog)[:50]
        users = {"light": LIGHT_EVENTS, "heavy": HEAVY_EVENTS}

        async def write() -> None:
            store = StateStore(settings, session.meta.version, session.meta.hidden_size)
            await store.start()
            proc = InterestProcessor(session, store, settings, catalog, {settings.input_topic: 1})
            offset = 0
            for k in range(max(users.values())):
                msgs = []
                for u, count in users.items():
                    if k < count:
                        ev = {
                            "user_id": u,
                            "item_id": items[k % len(items)],
                            "ts": 1000 + 60 * k,
                            "event_id": f"{u}{k}",
                        }
                        msgs.append(RawMessage(settings.input_topic, 0, offset, u.encode(), orjson.dumps(ev), -1.0))
                        offset += 1
                await proc.write(await proc.prepare(msgs))
            await store.close()

        asyncio.run(write())
        client = redis.Redis.from_url(env["INTEREST_REDIS_URL"])
        out: dict = {"hidden": session.meta.hidden_size, "categories": len(session.meta.categories)}
        try:
            for u, count in users.items():
                key = user_key(settings.redis_prefix, version_tag(session.meta.version), u)
                fields = {f: int(client.hstrlen(key, f)) for f in WRITE_FIELDS}
                out[u] = {
                    "events": count,
                    "memory_usage": int(client.memory_usage(key, samples=0) or 0),
                    "encoding": client.object("encoding", key).decode(),
                    "field_bytes": fields,
                    "value_bytes": sum(fields.values()),
                    "key_bytes": len(key),
                }
            limit = client.config_get("hash-max-listpack-value")["hash-max-listpack-value"]
            out["hash_max_listpack_value"] = int(limit or 0)
        finally:
            client.close()
        log(f"bytes per user: light {out['light']['memory_usage']}, heavy {out['heavy']['memory_usage']}")
        return out

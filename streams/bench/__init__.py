"""``interest-stream bench --out DIR [--quick] [--model PATH] [--no-profile]``: the worker against its ceilings.

    interest-stream bench --out artifacts/bench                 # full run, ~6-8 min on 2 cores
    interest-stream bench --out artifacts/bench-quick --quick   # CI smoke, < 3 min (small event counts)

Everything runs in one go on one Apache Kafka broker (KRaft, one node) and one Redis, both started here on free ports
and stopped at the end,
with the model of ``--model`` (default: ``build_default_model()``; ``--quick``: a fast model in
``artifacts/models/bench-fast``). Figures (events/s unless said otherwise):

1. ceilings: (a) ``faust_noop_eps``: a Faust agent in its own process (``python -m streams.bench noop-worker``) that
   takes batches of 2000 with ``take_events`` from the pre-filled JSON topic and discards them (the issue's ceiling; the
   worker collects its batches itself, see ``streams.runtime.app.BatchPipeline``); (b) ``aiokafka_raw_eps``: a bare
   aiokafka consumer (``getmany``, no group) on the same topic; (c) ``ort_step_eps``: the worker's stepping alone
   (``BatchStepper``: grouped sequence-graph calls, 1 intra-op thread) on ML-100K batches of 2000 events, beside the
   round-by-round stepping it replaced (``round_by_round_eps``); (d) ``redis_pipeline_eps``: ``StateStore.write`` (CAS
   script, one pipeline) of worker-shaped user records, 2000 per pipeline (writes/s: the worker writes at most one per
   user per batch).
2. the product: ``interest-stream worker`` processes over ML-100K replayed ``loops`` times with user ids distinct per
   loop, pre-filled, measured from the first to the last applied event by polling the workers'
   ``interest_events_applied_total``; one worker, then two (each run: fresh consumer group, output topics, Redis db
   and prefix; the read-only input topic is shared).
3. ``naive_eps``: the same decoder/encoder/session/state code, one event at a time: one ORT call, one Redis write and
   one awaited send per event (``async for`` over an aiokafka consumer, ``InterestProcessor.prepare([msg])``).
4. latency at an offered rate of half ``product_eps_1w`` (paced aiokafka producer, fresh topic, warm worker):
   ``latency_ms`` = produce -> Redis written, quantiles interpolated in the buckets of the worker's
   ``interest_latency_from_produce_seconds`` histogram (delta over the measured window; buckets 5-10 ms wide from
   10 to 60 ms, 20 ms to 100 ms, so a quantile is exact to its bucket); ``latency_output_ms`` = produce -> output
   record, exact per event: the output record's Kafka timestamp (set when the worker hands it to its producer) minus
   the time the bench sent the input;
   ``latency_transport_ms`` = the transport alone at the same rate: the same paced producer into a fresh topic, read
   by a bare aiokafka consumer in its own process (``python -m streams.bench floor-consumer``, the worker's fetch
   settings, no group), produce -> consumed. The worker cannot be faster than this floor. ``latency_faust_ms`` =
   Faust alone at the same rate: the no-op agent (``noop-worker --latency``) iterating ``stream.events()``,
   produce -> the agent has the event, where the worker's pipeline starts. ``latency_cpu_pct`` = CPU used during the
   latency run (``psutil``, % of one core): the machine, the worker with its step process (and each apart:
   ``worker_faust``, ``step_process``), the bench's producer, the broker and Redis.
   ``latency_stages_ms`` = where a batch's time went, per batch, from the worker's ``interest_batch_stage_seconds``
   (consume: its first event from produce to the agent; collect; step; write: delivered and in Redis).
   ``latency_output_ms_halves`` = produce -> output record in the run's first and second half (by send time), to
   show a tail that grows over the run.
5. scale in users: the same real event stream with every event given a synthetic id hashed into a space of 1,000 vs
   1,000,000 ids (with 200k events the 1M space touches ~180k distinct users, almost all cold and uncached: each
   costs a Redis read, a cold start and a new key); worker RSS (psutil, worker + step process, max during the run)
   and Redis bytes per user (``INFO memory`` used_memory delta / ``DBSIZE`` of the run's db).

6. the state tier (``streams/bench/cluster.py``): the 1-worker product on a local 3-master Redis Cluster (3 replicas)
   started beside the single Redis, with ``INTEREST_REDIS_WAIT_REPLICAS`` 0 and 1, and on the single Redis with one
   replica and WAIT 1 (``cluster_product_eps_1w``, ``cluster_wait1_product_eps_1w``, ``wait1_product_eps_1w``);
   ``cluster_redis_pipeline_eps``; produce -> Redis quantiles on the cluster at the offered rate of 4
   (``cluster_latency_ms``, ``cluster_wait1_latency_ms``); ``user_bytes``: ``MEMORY USAGE`` and ``HSTRLEN`` per field
   of a light (3 events) and a heavy (300 events) user's hash.

With profiling on (default in the full run), an extra one-worker product run is sampled with ``py-spy record``
(the worker and its step process, raw, ``DIR/profile-1w.txt``) and the top functions land in ``bench.json["profile"]``.
Outputs: ``DIR/bench.json``, ``DIR/bench.md`` (table, targets, pass/fail), ``DIR/bench.png`` (throughput bars and
latency CDF); worker and service logs under ``DIR/logs``.
"""

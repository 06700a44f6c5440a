"""A local Redis Cluster for the tests, the demo and the bench: 3 masters + 3 replicas of Debian's redis-server.

    interest-stream services up --redis-cluster     # nodes on 127.0.0.1:16380-16385, INTEREST_REDIS_CLUSTER=true
                                                    # INTEREST_REDIS_URL=redis://127.0.0.1:16380/0

Each node is a ``redis-server --cluster-enabled yes`` (its ``nodes.conf`` in its data folder, so a node killed and
started again on the same port rejoins as itself: as a replica of the replica that took its place). The cluster is
made by ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes``, and is ready once every node says
``cluster_state:ok`` with all 16384 slots and every replica's link to its master is up. The nodes time out a peer
after ``node_timeout_ms`` (2 s here, Redis's default is 15 s), so that a killed master's replica takes over in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from models.errors import ServiceError
from streams.local import services
from streams.local.services import (
    RUN_DIR,
    Service,
    ephemeral_low,
    free_port,
    pick_port,
    port_is_free,
    start_redis,
    wait_until,
)

LOCAL_CLUSTER_PORTS = tuple(range(16380, 16386))
NODE_TIMEOUT_MS = 2000


def redis_cli() -> Path:
    found = shutil.which("redis-cli")
    if not found:
        raise ServiceError("redis-cli not found; install it with `apt-get install -y redis-tools`")
    return Path(found)


@dataclass
class LocalCluster:
    """The nodes of a local Redis Cluster (a :class:`Service` each) and how to reach them."""

    nodes: list[Service]
    password: str | None = None
    run_dir: Path = RUN_DIR
    node_timeout_ms: int = NODE_TIMEOUT_MS
    extra: list[str] = field(default_factory=list)
    tls: tuple[Path, Path] | None = None  # (certificate = its own CA, key): every port, the bus and replication TLS

    @property
    def address(self) -> str:
        """host:port of the first node (the one the URL names)."""
        return self.nodes[0].address

    @property
    def url(self) -> str:
        """A URL naming one node (the cluster client finds the others)."""
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.nodes[0].port}/0"

    def _tls(self) -> dict:
        return {"ssl": True, "ssl_ca_certs": str(self.tls[0])} if self.tls else {}

    def node_client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node."""
        opts = {"socket_timeout": 2, "socket_connect_timeout": 2, **self._tls()}
        return redis.Redis(host="127.0.0.1", port=port, password=self.password, **opts)

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.live()[0].port, password=self.password, **self._tls())

    def live(self) -> list[Service]:
        return [n for n in self.nodes if n.alive()]

    def roles(self) -> dict[int, tuple[str, str]]:
        """Per live node port: (its node id, "master" or "slave") as the node itself says."""
        out = {}
        for n in self.live():
            with contextlib.closing(self.node_client(n.port)) as c:
                info = c.info("replication")
                out[n.port] = (c.execute_command("CLUSTER MYID").decode(), info["role"])
        return out

    def masters(self) -> list[int]:
        """Ports of the live masters that own slots (each as it sees itself in CLUSTER NODES)."""
        ports = []
        for n in self.live():
            with contextlib.closing(self.node_client(n.port)) as c:
                nodes = c.cluster("nodes")  # redis-py parses it: {"host:port@bus": {"flags", "slots", ...}}
            me = next(v for v in nodes.values() if "myself" in v["flags"])
            if "master" in me["flags"] and me["slots"]:
                ports.append(n.port)
        return sorted(ports)

    def replica_of(self, port: int) -> Service:
        """The live replica of the master on ``port``."""
        for n in self.live():
            with contextlib.closing(self.node_client(n.port)) as c:
                info = c.info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == port:
                return n
        raise ServiceError(f"the master on {port} has no live replica")

    def slots_of(self, port: int) -> int:
        """How many slots the node on ``port`` serves, as it sees itself."""
        with contextlib.closing(self.node_client(port)) as c:
            me = next(v for v in c.cluster("nodes").values() if "myself" in v["flags"])
        return sum(int(r[-1]) - int(r[0]) + 1 for r in me["slots"])

    def node_id(self, port: int) -> str:
        with contextlib.closing(self.node_client(port)) as c:
            return c.execute_command("CLUSTER MYID").decode()

    def healthy(self) -> bool:
        """Every live node: cluster_state ok, 16384 slots served; every live replica's master link up."""
        for n in self.live():
            with contextlib.closing(self.node_client(n.port)) as c:
                info = c.cluster("info")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                    return False
                repl = c.info("replication")
                if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                    return False
        return True

    def wait_healthy(self, timeout: float = 60.0) -> None:
        wait_until(self.healthy, timeout, 0.2, f"Redis Cluster on {[n.port for n in self.nodes]} to be ok")

    def kill(self, port: int) -> Service:
        """kill -9 one node; returns its service (start it again with :meth:`restart`)."""
        svc = next(n for n in self.nodes if n.port == port)
        svc.stop(signal.SIGKILL)
        return svc

    def restart(self, port: int) -> None:
        """Start a killed node again on its port and folder: it rejoins with its old id (as a replica if its replica
        was promoted meanwhile)."""
        i = next(i for i, n in enumerate(self.nodes) if n.port == port)
        self.nodes[i] = _start_node(port, self.run_dir, self.password, self.node_timeout_ms, self.extra, self.tls)

    def reshard(self, source: int, target: int, slots: int, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """``redis-cli --cluster reshard``: move ``slots`` slots (with their keys) from master ``source`` to master
        ``target`` (ports)."""
        argv = [str(redis_cli()), "--cluster", "reshard", f"127.0.0.1:{source}"]
        argv += ["--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target)]
        argv += ["--cluster-slots", str(slots), "--cluster-yes", *_cli_tls(self.tls)]
        return _cli(argv, self.password, timeout)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop(timeout=10.0)


def _cli(argv: list[str], password: str | None, timeout: float) -> subprocess.CompletedProcess:
    env = {"REDISCLI_AUTH": password} if password else {}  # not on the command line, where ps shows it
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **env})
    if done.returncode != 0:
        raise ServiceError(f"{' '.join(argv[1:4])} failed: {(done.stderr or done.stdout).strip()[-400:]}")
    return done


def node_port() -> int:
    """A free port for a cluster node whose bus port (10000 above it, Redis's rule) is free too: both below the
    kernel's ephemeral range where it leaves room (see :func:`~streams.local.services.free_port`), node ports 5,000
    below the ports free_port hands out and bus ports clear of both."""
    low = ephemeral_low()
    if low > 28_000:
        port = pick_port(low - 20_768, low - 15_768, lambda p: port_is_free(p) and port_is_free(p + 10_000))
        if port is not None:
            return port
    for _ in range(200):
        port = free_port()
        if port <= 55535 and port_is_free(port + 10000):
            return port
    raise ServiceError("no free port pair (port, port + 10000) on 127.0.0.1 for a Redis Cluster node")


def _cli_tls(tls: tuple[Path, Path] | None) -> list[str]:
    return ["--tls", "--cacert", str(tls[0])] if tls else []


def _start_node(
    port: int,
    run_dir: Path,
    password: str | None,
    node_timeout_ms: int,
    extra: Sequence[str],
    tls: tuple[Path, Path] | None = None,
) -> Service:
    args = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
    args += ["--cluster-node-timeout", str(node_timeout_ms)]
    if password:
        args += ["--masterauth", password]  # a replica logs in to its master with it
    if tls:
        args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
    name = f"redis-cluster-{port}"
    return start_redis(port=port, run_dir=run_dir, password=password, extra=[*args, *extra], name=name, tls=tls)


def start_redis_cluster(
    ports: Sequence[int] | None = None,
    run_dir: Path = RUN_DIR,
    replicas: int = 1,
    password: str | None = None,
    node_timeout_ms: int = NODE_TIMEOUT_MS,
    extra: Sequence[str] = (),
    timeout: float = 90.0,
    tls: tuple[Path, Path] | None = None,
) -> LocalCluster:
    """Start ``len(ports)`` cluster nodes (default 6 free ports: 3 masters + 3 replicas) on 127.0.0.1, make the cluster
    (``redis-cli --cluster create``), and wait until it is ok everywhere. Stops what it started if that fails."""
    ports = list(ports) if ports is not None else [node_port() for _ in range(6)]
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster([], password, run_dir, node_timeout_ms, list(extra), tls)
    try:
        # nodes started before in this folder know their cluster already (nodes.conf): they re-form it themselves
        made = all((run_dir / f"redis-{p}" / f"nodes-{p}.conf").exists() for p in ports)
        for port in ports:
            cluster.nodes.append(_start_node(port, run_dir, password, node_timeout_ms, extra, tls))
        if not made:
            argv = [str(redis_cli()), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
            argv += ["--cluster-replicas", str(replicas), "--cluster-yes", *_cli_tls(tls)]
            _cli(argv, password, timeout)
        cluster.wait_healthy(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# --- interest-stream services up|down|status [--redis-cluster] ------------------------------------------------------


def cluster_pids(run_dir: Path) -> dict[int, int]:
    """Per port, the pid of each local cluster node started by ``services up --redis-cluster`` (alive or not)."""
    out = {}
    for f in sorted(run_dir.glob("redis-cluster-*.pid")):
        known = services.read_pid_file(f)
        if known:
            out[known[1]] = known[0]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    services.add_arguments(parser)
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help=f"a local Redis Cluster (3 masters + 3 replicas on 127.0.0.1:{LOCAL_CLUSTER_PORTS[0]}-"
        f"{LOCAL_CLUSTER_PORTS[-1]}) instead of the single Redis",
    )


def run(args: argparse.Namespace) -> int:
    if not args.redis_cluster:
        return services.run(args)
    run_dir: Path = args.run_dir
    pids = cluster_pids(run_dir)
    alive = {port for port, pid in pids.items() if services.pid_alive(pid)}
    if args.action == "up":
        services.services_up(run_dir, redis=False)
        if alive == set(LOCAL_CLUSTER_PORTS):
            print(f"redis cluster: already running on 127.0.0.1:{LOCAL_CLUSTER_PORTS[0]}-{LOCAL_CLUSTER_PORTS[-1]}")
        else:
            cluster = start_redis_cluster([p for p in LOCAL_CLUSTER_PORTS if p not in alive], run_dir)
            print(f"redis cluster: up, {len(cluster.masters())} masters; use INTEREST_REDIS_CLUSTER=true "
                  f"INTEREST_REDIS_URL=redis://127.0.0.1:{LOCAL_CLUSTER_PORTS[0]}/0")  # fmt: skip
        return 0
    if args.action == "down":
        services.services_down(run_dir, redis=False)
        for port, pid in pids.items():
            services.stop_pid(pid, timeout=10.0)
            (run_dir / f"redis-cluster-{port}.pid").unlink(missing_ok=True)
        print(f"redis cluster: {len(alive)} nodes stopped")
        return 0
    broker = services.services_status(run_dir, redis=False)
    print(f"redis cluster: {len(alive)} of {len(LOCAL_CLUSTER_PORTS)} nodes running")
    return broker if len(alive) == len(LOCAL_CLUSTER_PORTS) else 1

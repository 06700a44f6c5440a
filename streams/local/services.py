"""Local services for the demo, the tests and the bench: Apache Kafka (KRaft, one node) and redis-server.

    interest-stream services up      # Kafka on 127.0.0.1:19092, Redis on 127.0.0.1:16379 (pids, logs, data: .run/)
    interest-stream services down
    interest-stream services status

Each service runs on 127.0.0.1 on its own port; ``up`` refuses clearly when a port is taken and returns only once
the service answers (a Kafka metadata request, a Redis PING). The broker's jars come from Maven Central
(``deps/kafka/pom.xml``, fetched by ``make setup`` into ``.deps/kafka/libs``); its log lives on disk under the run
directory, so a broker stopped or killed and started again on the same port and folder keeps every topic and offset.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from models.errors import ServiceError
from streams.settings import LOCAL_KAFKA_PORT, LOCAL_REDIS_PORT

RUN_DIR = Path(".run")
REPO = Path(__file__).resolve().parents[2]
KAFKA_LIBS = REPO / ".deps" / "kafka" / "libs"
KAFKA_HEAP = "512m"


def java_binary() -> Path:
    """``java`` from JAVA_HOME or the PATH (Debian's ``openjdk-17-jdk-headless``; ``make setup`` installs it)."""
    home = Path(os.environ.get("JAVA_HOME") or "/nonexistent")
    found = str(home / "bin" / "java") if (home / "bin" / "java").exists() else shutil.which("java")
    if not found:
        raise ServiceError("java not found; `make setup` installs it (apt-get install -y openjdk-17-jdk-headless)")
    return Path(found)


def kafka_version(libs: Path = KAFKA_LIBS) -> str:
    """The version of the broker jar Maven fetched for ``deps/kafka/pom.xml`` into ``libs`` (e.g. ``4.1.2``)."""
    jars = sorted(libs.glob("kafka_2.13-*.jar"))
    if not jars:
        raise ServiceError(f"Apache Kafka's jars are not in {libs}; run `make setup` (Maven fetches them)")
    return jars[-1].name.removeprefix("kafka_2.13-").removesuffix(".jar")


def kafka_classpath(libs: Path = KAFKA_LIBS) -> str:
    """The broker's classpath: every jar in ``libs`` (after checking the broker's is there)."""
    kafka_version(libs)
    return str(libs / "*")


def redis_binary() -> Path:
    """Path of ``redis-server`` (Debian package ``redis-server``)."""
    found = shutil.which("redis-server")
    if not found:
        raise ServiceError("redis-server not found; install it with `apt-get install -y redis-server`")
    return Path(found)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port and it can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_HANDED_OUT: set[int] = set()  # ports free_port / pick_port returned in this process: never returned twice
_RNG = random.Random()  # its own: a test seeding the global one must not make two processes pick the same ports


def ephemeral_low() -> int:
    """The first port of the kernel's range for client sockets' local ports (Linux's default: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_port(lo: int, hi: int, ok: Callable[[int], bool] = port_is_free) -> int | None:
    """A random port of [lo, hi] that ``ok`` accepts and this process has not handed out before (None: none found)."""
    for _ in range(500):
        port = _RNG.randint(lo, hi)
        if port not in _HANDED_OUT and ok(port):
            _HANDED_OUT.add(port)
            return port
    return None


def free_port() -> int:
    """A port free right now on 127.0.0.1, for a service this process is about to start.

    Taken from the 5,000 ports below the kernel's ephemeral range where there is room: a port the kernel hands out
    itself (bind to port 0) is also where it puts client sockets' local ports, and one of the many connections a
    test session makes took such a port between its pick and the service's start. Never the same port twice in one
    process; the kernel's choice only where the ephemeral range leaves no room below it."""
    low = ephemeral_low()
    if low > 28_000:
        port = pick_port(low - 5_000, low - 1)
        if port is not None:
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    error: type[Exception] = ServiceError,
) -> object:
    """Poll ``predicate`` until it returns something true (returned); raise ``error`` after ``timeout`` seconds.

    Exceptions from ``predicate`` count as "not yet" (a service still starting); the last one is named on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet
            last_exc = exc
        time.sleep(interval)
    detail = f" (last error: {last_exc!r})" if last_exc else ""
    raise error(f"timed out after {timeout:.0f}s waiting for {what}{detail}")


def kafka_answers(bootstrap: str) -> bool:
    """True when the broker answers a metadata request."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        admin.list_topics()
        return True
    finally:
        admin.close()


def redis_answers(url: str, **options: object) -> bool:
    """True when Redis answers PING (``options`` go to the client: a TLS CA)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1, **options)
    try:
        return bool(client.ping())
    finally:
        client.close()


@dataclass
class Service:
    """One local server process, started detached, with its pid file and log."""

    name: str
    port: int
    pid: int
    log: Path
    pid_file: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Stop the process and wait until it has exited (SIGKILL after ``timeout``); Kafka's controlled shutdown
        flushes its log and takes a few seconds."""
        stop_pid(self.pid, sig, timeout)
        self.pid_file.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    # a zombie child of ours counts as gone
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Send ``sig`` and wait for exit; SIGKILL after ``timeout``."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def _spawn(name: str, argv: list[str], port: int, run_dir: Path) -> Service:
    run_dir.mkdir(parents=True, exist_ok=True)
    # a server killed a moment ago may still hold its port while the kernel closes its sockets: allow a few seconds
    deadline = time.monotonic() + 3.0
    while not port_is_free(port):
        if time.monotonic() > deadline:
            raise ServiceError(f"port {port} on 127.0.0.1 is taken; cannot start {name} (stop what holds it first)")
        time.sleep(0.1)
    log = run_dir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    pid_file = run_dir / f"{name}.pid"
    pid_file.write_text(f"{proc.pid} {port}\n")
    return Service(name=name, port=port, pid=proc.pid, log=log, pid_file=pid_file)


# A single-node KRaft broker for development: every internal topic with one replica; no delay before the first
# rebalance of a new group (the broker's 3 s default would add to every worker start); a 3 s broker session (9 s by
# default), which a broker restarted after a kill -9 waits out before it serves; the worker's partition count for
# topics created on first use. Everything else is Apache Kafka's default.
_BROKER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={log_dir}
num.partitions=8
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=1000
"""

_BROKER_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""


def _cluster_id() -> str:
    """A random Kafka cluster id (a UUID, URL-safe base64 without padding, as ``kafka-storage random-uuid``)."""
    while True:  # one in 64 starts with "-", which kafka-storage's argument parser takes for an option
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _broker_folder(port: int, run_dir: Path) -> Path:
    """Config, log4j2 file and the log of the broker on ``port``: kept across restarts."""
    return (run_dir / f"kafka-{port}").resolve()


def _prepare_broker(port: int, run_dir: Path) -> tuple[Path, list[str]]:
    """Write the broker's config (once; a restart reuses it, controller port included) and format its storage
    (once: ``meta.properties`` marks a formatted log). Returns the config path and the JVM's leading argv."""
    folder = _broker_folder(port, run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "server.properties"
    log4j = folder / "log4j2.properties"
    log_dir = folder / "data"
    if not config.exists():
        controller_port = LOCAL_KAFKA_PORT + 1 if port == LOCAL_KAFKA_PORT else free_port()
        config.write_text(_BROKER_PROPERTIES.format(port=port, controller_port=controller_port, log_dir=log_dir))
    log4j.write_text(_BROKER_LOG4J2)
    jvm = [str(java_binary()), f"-Xms{KAFKA_HEAP}", f"-Xmx{KAFKA_HEAP}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    jvm += ["-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}"]
    jvm += ["-cp", kafka_classpath()]
    if not (log_dir / "meta.properties").exists():
        fmt = subprocess.run(
            [*jvm, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise ServiceError(f"formatting the Kafka log in {log_dir} failed: {fmt.stderr.strip()[-500:]}")
    return config, jvm


def start_broker(port: int = LOCAL_KAFKA_PORT, run_dir: Path = RUN_DIR, timeout: float = 90.0) -> Service:
    """Start Apache Kafka (KRaft: broker and controller in one JVM) on 127.0.0.1:port and wait until it answers.

    Its log is on disk in ``run_dir/kafka-<port>/``: started again with the same port and folder (after a stop or a
    ``kill -9``), it recovers and keeps every topic, record and committed offset.
    """
    config, jvm = _prepare_broker(port, run_dir)
    name = "broker" if run_dir == RUN_DIR else f"broker-{port}"
    svc = _spawn(name, [*jvm, "kafka.Kafka", str(config)], port, run_dir)
    try:
        wait_until(lambda: svc.alive() and kafka_answers(svc.address), timeout, 0.25, f"Kafka on {svc.address}")
    except ServiceError:
        svc.stop(signal.SIGKILL)
        raise ServiceError(f"Kafka did not come up on {svc.address}; see {svc.log}") from None
    return svc


def start_redis(
    port: int = LOCAL_REDIS_PORT,
    run_dir: Path = RUN_DIR,
    persistence: bool = False,
    password: str | None = None,
    timeout: float = 20.0,
    extra: Sequence[str] = (),
    name: str | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Service:
    """Start redis-server on 127.0.0.1:port (persistence off unless asked: AOF everysec + RDB in run_dir); ``extra``
    arguments go last (a cluster node's). With ``tls`` (a certificate, its own CA, and its key) the port speaks TLS
    only (``rediss://``; clients are not asked for certificates)."""
    data_dir = (run_dir / f"redis-{port}").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    listen = ["--port", str(port)]
    if tls:
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls[0]), "--tls-key-file"]
        listen += [str(tls[1]), "--tls-ca-cert-file", str(tls[0]), "--tls-auth-clients", "no"]
    argv = [str(redis_binary()), "--bind", "127.0.0.1", *listen, "--dir", str(data_dir)]
    argv += ["--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"]
    # a user's hash (one 1 KB state field) stays a compact listpack: ~1.9 KB instead of ~2.7 KB per user
    argv += ["--hash-max-listpack-value", "2048"]
    if persistence:
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1000"]
    else:
        argv += ["--appendonly", "no", "--save", ""]
    if password:
        argv += ["--requirepass", password]
    argv += list(extra)
    svc = _spawn(name or (f"redis-{port}" if run_dir != RUN_DIR else "redis"), argv, port, run_dir)
    auth = f":{password}@" if password else ""
    url = f"{'rediss' if tls else 'redis'}://{auth}127.0.0.1:{port}/0"
    ca = {"ssl_ca_certs": str(tls[0])} if tls else {}
    try:
        wait_until(lambda: svc.alive() and redis_answers(url, **ca), timeout, 0.1, f"Redis on {svc.address}")
    except ServiceError:
        svc.stop(signal.SIGKILL)
        raise ServiceError(f"Redis did not come up on {svc.address}; see {svc.log}") from None
    return svc


def scrape_metrics(port: int) -> dict[str, float]:
    """All samples of a worker's Prometheus endpoint on 127.0.0.1:port: ``name{labels}`` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def metric_total(samples: dict[str, float], name: str) -> float:
    """Sum of one metric's samples over all its labels (0 if absent)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


@dataclass
class WorkerProcess:
    """One ``interest-stream worker`` process (demo, benchmark, tests) with its metrics port and log file."""

    proc: subprocess.Popen
    metrics_port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def samples(self) -> dict[str, float]:
        return scrape_metrics(self.metrics_port)

    def metric(self, name: str) -> float:
        """A metric's total; raises OSError while the endpoint is not up."""
        return metric_total(self.samples(), name)

    def kill(self) -> None:
        """kill -9, and reap."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``); the exit code."""
        stop_pid(self.proc.pid, signal.SIGTERM, timeout)
        return self.proc.wait(timeout=5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def spawn_worker(env: dict[str, str], log: Path, cwd: Path | None = None) -> WorkerProcess:
    """Start ``interest-stream worker`` with exactly the INTEREST_* variables in ``env`` (the caller's are dropped)
    and a free metrics port unless ``env`` names one; output goes to ``log``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("INTEREST_")}
    full.update(env)
    port = int(full.get("INTEREST_METRICS_PORT") or 0) or free_port()
    full.update({"INTEREST_METRICS_PORT": str(port), "PYTHONUNBUFFERED": "1"})
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"],
            env=full,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return WorkerProcess(proc, port, log)


def read_pid_file(path: Path) -> tuple[int, int] | None:
    try:
        pid, port = path.read_text().split()
        return int(pid), int(port)
    except (OSError, ValueError):
        return None


def services_up(run_dir: Path = RUN_DIR, redis: bool = True) -> None:
    """Bring the local broker and Redis (unless not ``redis``) up (idempotent: running ones are left alone)."""
    for name, start, port in (
        ("broker", start_broker, LOCAL_KAFKA_PORT),
        ("redis", start_redis, LOCAL_REDIS_PORT),
    )[: 2 if redis else 1]:
        known = read_pid_file(run_dir / f"{name}.pid")
        if known and pid_alive(known[0]):
            print(f"{name}: already running (pid {known[0]}, 127.0.0.1:{known[1]})")
            continue
        svc = start(port=port, run_dir=run_dir)
        print(f"{name}: up on {svc.address} (pid {svc.pid}, log {svc.log})")


def services_down(run_dir: Path = RUN_DIR, redis: bool = True) -> None:
    """Stop what ``services_up`` started."""
    for name in ("broker", "redis")[: 2 if redis else 1]:
        pid_file = run_dir / f"{name}.pid"
        known = read_pid_file(pid_file)
        if known and pid_alive(known[0]):
            stop_pid(known[0], timeout=60.0)
            print(f"{name}: stopped (pid {known[0]})")
        else:
            print(f"{name}: not running")
        pid_file.unlink(missing_ok=True)


def services_status(run_dir: Path = RUN_DIR, redis: bool = True) -> int:
    """Print each service's state; 0 when both run."""
    ok = True
    for name in ("broker", "redis")[: 2 if redis else 1]:
        known = read_pid_file(run_dir / f"{name}.pid")
        running = bool(known and pid_alive(known[0]))
        ok &= running
        print(f"{name}: running on 127.0.0.1:{known[1]} (pid {known[0]})" if running and known else f"{name}: stopped")
    return 0 if ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="pid files and logs (default .run/)")


def run(args: argparse.Namespace) -> int:
    if args.action == "up":
        services_up(args.run_dir)
        return 0
    if args.action == "down":
        services_down(args.run_dir)
        return 0
    return services_status(args.run_dir)

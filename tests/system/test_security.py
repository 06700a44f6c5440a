"""Secrets stay secret; SASL/SSL/ACL settings map to the clients as documented.

* a worker against a password-protected Redis (password in INTEREST_REDIS_URL) with a Kafka SASL password set (the
  local broker speaks PLAINTEXT only, so the protocol stays PLAINTEXT: the value must still never leak): neither
  secret appears in the worker's log (at DEBUG), its /metrics page, or ``interest-stream lookup``/``verify`` output;
* the README's least-privilege ACL line is enough for the worker, lookup and verify;
* a wrong Redis password gives a clear one-line error that echoes neither password;
* ``Settings.redacted()``/``redact_url`` mask every secret; ``KafkaConnection`` renders SASL/SSL for every client.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from streams.local.cluster import start_redis_cluster
from streams.local.services import free_port, start_redis
from streams.settings import Settings, redact_url
from tests.conftest import REPO
from tests.harness import applied_events, ml_events, produce, start_worker, wait_for, worker_env
from tests.harness import run_cli as cli

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


# --- pure logic ----------------------------------------------------------------------------------------------------


def test_redacted_masks_every_secret():
    s = Settings(
        redis_url="rediss://alice:url-secret-1@redis.example:6380/0",
        redis_password="redis-secret-2",
        kafka_sasl_password="sasl-secret-3",
        kafka_sasl_username="bob",
    )
    text = orjson.dumps(s.redacted()).decode()
    for secret in ("url-secret-1", "redis-secret-2", "sasl-secret-3"):
        assert secret not in text
    red = s.redacted()
    assert red["redis_url"] == "rediss://alice:***@redis.example:6380/0"
    assert red["redis_password"] == "***" and red["kafka_sasl_password"] == "***"
    assert red["kafka_sasl_username"] == "bob"
    assert Settings().redacted()["kafka_sasl_password"] is None


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw-SECRET@127.0.0.1:6379/0",
        "redis://user:pw-SECRET@127.0.0.1:6379/0",
        "rediss://user:pw-SECRET@host/0",
        "redis://user:pw%40SECRET@host:1/2",
        "redis://127.0.0.1:6379/0?password=pw-SECRET",  # redis-py also takes the password from the query
        "redis://127.0.0.1:6379/0?socket_timeout=1&password=pw-SECRET",
    ],
)
def test_redact_url_masks_passwords(url):
    red = redact_url(url)
    assert "SECRET" not in red, red
    assert red.split("://")[0] == url.split("://")[0]


def test_client_config_maps_sasl_and_ssl(tmp_path):
    from streams.kafka import client_config

    plain = client_config(Settings(kafka_bootstrap="a:1, b:2"))
    assert plain == {"bootstrap_servers": ["a:1", "b:2"], "security_protocol": "PLAINTEXT"}

    sasl = client_config(
        Settings(
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="SCRAM-SHA-256",
            kafka_sasl_username="bob",
            kafka_sasl_password="pw",
        )
    )
    assert sasl["security_protocol"] == "SASL_PLAINTEXT"
    assert (sasl["sasl_mechanism"], sasl["sasl_plain_username"], sasl["sasl_plain_password"]) == (
        "SCRAM-SHA-256",
        "bob",
        "pw",
    )
    assert not any(k.startswith("ssl_") for k in sasl)

    full = client_config(
        Settings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username="bob",
            kafka_sasl_password="pw",
            kafka_ssl_cafile=tmp_path / "ca.pem",
            kafka_ssl_certfile=tmp_path / "c.pem",
            kafka_ssl_keyfile=tmp_path / "k.pem",
        )
    )
    assert full["security_protocol"] == "SASL_SSL" and full["sasl_mechanism"] == "PLAIN"
    assert full["ssl_cafile"] == str(tmp_path / "ca.pem")
    assert full["ssl_certfile"] == str(tmp_path / "c.pem") and full["ssl_keyfile"] == str(tmp_path / "k.pem")

    tls = client_config(Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "ca.pem"))
    assert tls["ssl_cafile"] == str(tmp_path / "ca.pem") and "sasl_mechanism" not in tls
    # SSL files are ignored unless the protocol uses TLS
    assert "ssl_cafile" not in client_config(Settings(kafka_ssl_cafile=tmp_path / "ca.pem"))


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl not available to make a client certificate")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=interest-stream-test", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def sasl_ssl(tmp_path: Path, mechanism: str) -> Settings:
    """Settings for SASL over mutual TLS, user bob, with a fresh self-signed certificate as CA and client cert."""
    cert, key = self_signed(tmp_path)
    return Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="bob",
        kafka_sasl_password="pw",
        kafka_ssl_cafile=cert,
        kafka_ssl_certfile=cert,
        kafka_ssl_keyfile=key,
    )


def test_broker_credentials_map_sasl_and_ssl(tmp_path):
    import faust
    from faust.types.auth import AuthProtocol, SASLMechanism

    from streams.kafka import KafkaConnection

    def broker_credentials(settings: Settings):
        return KafkaConnection.from_settings(settings).faust_credentials()

    assert broker_credentials(Settings()) is None

    plain = broker_credentials(
        Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="bob", kafka_sasl_password="pw")
    )
    assert isinstance(plain, faust.SASLCredentials)
    assert (plain.username, plain.password, plain.ssl_context) == ("bob", "pw", None)
    assert plain.mechanism == SASLMechanism.PLAIN and plain.protocol == AuthProtocol.SASL_PLAINTEXT

    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        scram = broker_credentials(
            Settings(
                kafka_security_protocol="SASL_PLAINTEXT",
                kafka_sasl_mechanism=mech,
                kafka_sasl_username="bob",
                kafka_sasl_password="pw",
            )
        )
        assert scram.mechanism == SASLMechanism(mech) and scram.password == "pw"

    tls = broker_credentials(Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=CA_BUNDLE))
    assert isinstance(tls, faust.SSLCredentials)
    assert isinstance(tls.context, ssl.SSLContext) and tls.context.verify_mode == ssl.CERT_REQUIRED
    assert tls.context.cert_store_stats()["x509_ca"] > 0  # the CA file was loaded

    both = broker_credentials(sasl_ssl(tmp_path, "SCRAM-SHA-512"))
    assert isinstance(both, faust.SASLCredentials)
    assert both.protocol == AuthProtocol.SASL_SSL and isinstance(both.ssl_context, ssl.SSLContext)
    assert both.mechanism == SASLMechanism.SCRAM_SHA_512 and both.username == "bob"


def test_redis_options_take_acl_user_password_and_tls_ca():
    from streams.core.state import redis_options

    opts = redis_options(
        Settings(
            redis_url="rediss://h:6380/0",
            redis_username="interest",
            redis_password="pw",
            redis_ssl_ca_certs=CA_BUNDLE,
        )
    )
    assert (opts["username"], opts["password"], opts["ssl_ca_certs"]) == ("interest", "pw", str(CA_BUNDLE))
    assert "ssl_ca_certs" not in redis_options(Settings(redis_url="redis://h/0", redis_ssl_ca_certs=CA_BUNDLE))
    assert "password" not in redis_options(Settings())


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(params=["single", "cluster"])
def secret_redis(request, tmp_path):
    """A password-protected Redis, or Redis Cluster (3 + 3 nodes, the replicas logging in with it): (service,
    password, extra worker variables, ports of every node)."""
    password = "rpw-" + uuid.uuid4().hex
    if request.param == "single":
        svc = start_redis(free_port(), tmp_path / "redis", password=password)
        yield svc, password, {}, [svc.port]
        svc.stop()
        return
    cluster = start_redis_cluster(run_dir=tmp_path / "cluster", password=password)
    yield cluster, password, {"INTEREST_REDIS_CLUSTER": "true"}, [n.port for n in cluster.nodes]
    cluster.stop()


def readme_acl_lines(admin: redis.Redis, password: str, prefix: str, cluster: bool) -> list[list[str]]:
    """The least-privilege ACL line of docs/operations.md (the README's security section links there), for this
    password and key prefix (and on a cluster the line that adds what the cluster client needs).

    ``+client|setinfo`` exists from Redis 7.2 on; older servers (Debian's 7.0) reject the rule, so it is dropped
    there (redis-py ignores a refused CLIENT SETINFO)."""
    text = (REPO / "docs" / "operations.md").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ACL SETUSER interest ")]
    assert lines, "docs/operations.md lost its ACL lines"
    out = []
    for line in lines[: 2 if cluster else 1]:
        args = line.replace(">CHANGE-ME", f">{password}").replace("~interest:*", f"~{prefix}*").split()
        major, minor = (int(x) for x in admin.info("server")["redis_version"].split(".")[:2])
        if (major, minor) < (7, 2):
            args = [a for a in args if a.lower() != "+client|setinfo"]
        out.append(args)
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_secrets_never_leak_into_logs_metrics_or_cli_output(
    names, kafka_bootstrap, trained_model, data_dir, secret_redis, tmp_path
):
    svc, redis_pw, redis_env, ports = secret_redis
    sasl_pw = "spw-" + uuid.uuid4().hex
    acl_pw = "apw-" + uuid.uuid4().hex
    secrets = (redis_pw, sasl_pw, acl_pw)
    url = f"redis://:{redis_pw}@{svc.address}/0"
    # the README's least-privilege line, for this test's key prefix, on every node (ACLs are per node)
    for port in ports:
        with redis.Redis(port=port, password=redis_pw) as node:
            for args in readme_acl_lines(node, acl_pw, names.redis_prefix, bool(redis_env)):
                node.execute_command(*args)
    admin = redis.RedisCluster.from_url(url) if redis_env else redis.Redis.from_url(url)
    acl_url = f"redis://interest:{acl_pw}@{svc.address}/0"

    events = ml_events(data_dir, 500)
    extra = {
        "INTEREST_KAFKA_SASL_USERNAME": "bob",
        "INTEREST_KAFKA_SASL_PASSWORD": sasl_pw,
        "INTEREST_LOG_LEVEL": "DEBUG",
        **redis_env,
    }
    w1 = start_worker(names, kafka_bootstrap, url, trained_model, tmp_path / "w1", **extra)
    try:
        produce(kafka_bootstrap, names.input_topic, events[:250])
        wait_for(lambda: applied_events(admin, names.redis_prefix) == 250, 120, "events applied (password URL)")
        with urllib.request.urlopen(f"http://127.0.0.1:{w1.metrics_port}/metrics", timeout=5) as resp:
            metrics_page = resp.read().decode()
    finally:
        assert w1.stop() == 0, w1.output()[-3000:]
    # the same through the least-privilege ACL user given as INTEREST_REDIS_USERNAME/PASSWORD
    w2 = start_worker(
        names,
        kafka_bootstrap,
        f"redis://{svc.address}/0",
        trained_model,
        tmp_path / "w2",
        INTEREST_REDIS_USERNAME="interest",
        INTEREST_REDIS_PASSWORD=acl_pw,
        **extra,
    )
    try:
        produce(kafka_bootstrap, names.input_topic, events[250:])
        wait_for(lambda: applied_events(admin, names.redis_prefix) == 500, 120, "events applied (ACL user)")
    finally:
        assert w2.stop() == 0, w2.output()[-3000:]

    logs = w1.output() + w2.output()
    assert "settings:" in logs and "DEBUG" in logs  # the settings line was logged (redacted), at DEBUG level
    user = events[0]["user_id"]
    outputs = {"worker logs": logs, "/metrics": metrics_page}
    for label, u in (("password URL", url), ("ACL user URL", acl_url)):
        env = worker_env(names, kafka_bootstrap, u, trained_model, **extra)
        for args in (
            ("lookup", user),
            ("lookup", user, "--json"),
            ("verify", "--dataset", "movielens-100k", "--data", str(data_dir / "ml-100k"), "--limit", "500"),
        ):
            res = cli(env, *args)
            assert res.returncode == 0, (label, args, res.stdout, res.stderr)
            outputs[f"{label}: {' '.join(args)}"] = res.stdout + res.stderr
        assert "OK:" in res.stdout  # verify passed

    # a wrong password: a clear one-line error, exit 2, echoing neither the wrong nor the right password
    wrong = "wrong-" + uuid.uuid4().hex
    for u in (f"redis://:{wrong}@{svc.address}/0", f"redis://interest:{wrong}@{svc.address}/0"):
        env = worker_env(names, kafka_bootstrap, u, trained_model, **extra)
        res = cli(env, "lookup", user)
        assert res.returncode == 2, (res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot read Redis at" in lines[0] and "***" in lines[0], res.stderr
        assert "Traceback" not in res.stderr
        outputs[f"wrong password lookup {u.split('@')[0].split(':')[1]}"] = res.stdout + res.stderr
        secrets += (wrong,)
    env = worker_env(names, kafka_bootstrap, f"redis://:{wrong}@{svc.address}/0", trained_model, **extra)
    res = cli(env, "verify", "--dataset", "movielens-100k", "--data", str(data_dir / "ml-100k"), "--limit", "5")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "cannot read Redis at" in res.stderr and "***" in res.stderr and "AuthenticationError" in res.stderr
    outputs["wrong password verify"] = res.stdout + res.stderr

    leaks = [(label, s[:8]) for label, text in outputs.items() for s in secrets if s in text]
    assert not leaks, f"secrets leaked into: {leaks}"
    admin.close()


def server_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not available to make a server certificate")
    cert, key = tmp_path / "redis.pem", tmp_path / "redis.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_worker_lookup_and_verify_over_tls(mode, names, kafka_bootstrap, trained_model, data_dir, tmp_path):
    """``rediss://`` with INTEREST_REDIS_SSL_CA_CERTS: one Redis, or a cluster whose every port, bus and replication
    link is TLS; the worker applies, lookup and verify read; a client without the CA is refused with one line."""
    cert, key = server_cert(tmp_path)
    if mode == "single":
        svc = start_redis(free_port(), tmp_path / "redis", tls=(cert, key))
        stop, redis_env = svc.stop, {}
        admin = redis.Redis.from_url(f"rediss://{svc.address}/0", ssl_ca_certs=str(cert))
    else:
        cluster = start_redis_cluster(run_dir=tmp_path / "cluster", tls=(cert, key))
        svc, stop, redis_env = cluster, cluster.stop, {"INTEREST_REDIS_CLUSTER": "true"}
        admin = cluster.client()
    try:
        url = f"rediss://{svc.address}/0"
        extra = {"INTEREST_REDIS_SSL_CA_CERTS": str(cert), **redis_env}
        events = ml_events(data_dir, 300)
        w = start_worker(names, kafka_bootstrap, url, trained_model, tmp_path / "w", **extra)
        try:
            produce(kafka_bootstrap, names.input_topic, events)
            wait_for(lambda: applied_events(admin, names.redis_prefix) == 300, 120, "events applied over TLS")
        finally:
            assert w.stop() == 0, w.output()[-3000:]
        env = worker_env(names, kafka_bootstrap, url, trained_model, **extra)
        res = cli(env, "verify", "--dataset", "movielens-100k", "--data", str(data_dir / "ml-100k"), "--limit", "300")
        assert res.returncode == 0 and res.stdout.startswith("OK:"), res.stdout + res.stderr
        res = cli(env, "lookup", events[0]["user_id"], "--json")
        assert res.returncode == 0 and '"probs"' in res.stdout, res.stderr
        no_ca = {k: v for k, v in env.items() if k != "INTEREST_REDIS_SSL_CA_CERTS"}
        res = cli(no_ca, "lookup", events[0]["user_id"])
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "cannot read Redis at" in lines[0], res.stderr[-2000:]
    finally:
        admin.close()
        stop()


@pytest.mark.integration
@pytest.mark.slow
def test_worker_with_wrong_redis_password_exits_with_a_clear_line(
    names, kafka_bootstrap, trained_model, secret_redis, tmp_path
):
    svc, redis_pw, redis_env, _ = secret_redis
    wrong = "wrong-" + uuid.uuid4().hex
    w = start_worker(
        names,
        kafka_bootstrap,
        f"redis://:{wrong}@{svc.address}/0",
        trained_model,
        tmp_path,
        ready=False,
        INTEREST_LOG_LEVEL="DEBUG",
        **redis_env,
    )
    t0 = time.monotonic()
    code = w.proc.wait(timeout=120)
    elapsed = time.monotonic() - t0
    out = w.output()
    assert code == 2, out[-3000:]
    # refused at once, not after the 30 s reachability timeout (a wrong password does not fix itself)
    assert elapsed < 25, f"took {elapsed:.1f}s to refuse a wrong password"
    assert "Traceback" not in out
    errors = [ln for ln in out.splitlines() if ln.startswith("interest-stream worker: error:")]
    assert len(errors) == 1 and "Redis" in errors[0] and "***" in errors[0], out[-2000:]
    assert wrong not in out and redis_pw not in out


def test_output_producer_maps_sasl_and_ssl(tmp_path):
    """The step process's own producer gets the same broker options as Faust's."""
    from streams.kafka import output_producer

    async def make(settings: Settings):
        producer = output_producer(settings)
        await producer.stop()  # never started: nothing to flush
        return producer.client, producer

    client, _ = asyncio.run(make(Settings(kafka_bootstrap="a:1,b:2")))
    assert client._bootstrap_servers == ["a:1", "b:2"] and client._security_protocol == "PLAINTEXT"
    assert client._ssl_context is None

    client, producer = asyncio.run(make(sasl_ssl(tmp_path, "SCRAM-SHA-256")))
    assert client._security_protocol == "SASL_SSL" and client._sasl_mechanism == "SCRAM-SHA-256"
    assert (client._sasl_plain_username, client._sasl_plain_password) == ("bob", "pw")
    assert isinstance(client._ssl_context, ssl.SSLContext) and client._ssl_context.cert_store_stats()["x509_ca"] > 0
    assert producer.client._client_id == "interest-stream"


def test_one_connection_rendered_for_librdkafka_and_aiokafka(tmp_path):
    """The same SASL-over-mutual-TLS settings, as confluent-kafka (librdkafka) and aiokafka take them."""
    from confluent_kafka import Producer

    from streams.kafka import KafkaConnection

    s = sasl_ssl(tmp_path, "SCRAM-SHA-512")
    conn = KafkaConnection.from_settings(s)
    rd = conn.librdkafka()
    assert rd["bootstrap.servers"] == s.kafka_bootstrap and rd["security.protocol"] == "sasl_ssl"
    assert (rd["sasl.mechanism"], rd["sasl.username"], rd["sasl.password"]) == ("SCRAM-SHA-512", "bob", "pw")
    assert rd["ssl.ca.location"] == str(s.kafka_ssl_cafile) and rd["ssl.key.location"] == str(s.kafka_ssl_keyfile)
    Producer(rd).flush(0)  # librdkafka refuses unknown properties and unreadable files when it is built
    assert KafkaConnection.from_settings(Settings()).librdkafka() == {
        "bootstrap.servers": Settings().kafka_bootstrap,
        "security.protocol": "plaintext",
    }
    aio = conn.aiokafka()
    assert isinstance(aio["ssl_context"], ssl.SSLContext) and aio["sasl_plain_username"] == "bob"
    assert not {k for k in aio if k.startswith("ssl_")} - {"ssl_context"}

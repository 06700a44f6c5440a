"""docker-compose.yml validates (docker-compose config; no engine needed) and agrees with the settings, the tested
Kafka version (deps/kafka/pom.xml), the metrics in streams/core/metrics.py and its Prometheus and Grafana configs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from streams.core.metrics import Metrics
from streams.settings import LOCAL_KAFKA_PORT, LOCAL_REDIS_PORT, Settings
from tests.conftest import REPO


@pytest.fixture(scope="module")
def compose() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (make setup installs it)")
    out = subprocess.run(
        [exe, "-f", str(REPO / "docker-compose.yml"), "config"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_services_and_profiles(compose: dict) -> None:
    services = compose["services"]
    assert {"kafka", "redis", "worker", "worker-gpu"} <= set(services)
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "appendonly" in " ".join(services["redis"]["command"]), "Redis must run with persistence"


def _host_ports(service: dict) -> set[int]:
    ports = set()
    for p in service.get("ports", []):
        ports.add(int(p["published"]) if isinstance(p, dict) else int(str(p).split(":")[0]))
    return ports


def test_host_ports_match_setting_defaults(compose: dict) -> None:
    s = Settings()
    assert LOCAL_KAFKA_PORT in _host_ports(compose["services"]["kafka"])
    assert s.kafka_bootstrap.endswith(f":{LOCAL_KAFKA_PORT}")
    assert LOCAL_REDIS_PORT in _host_ports(compose["services"]["redis"])
    assert f":{LOCAL_REDIS_PORT}/" in s.redis_url
    assert s.metrics_port in _host_ports(compose["services"]["worker"])


def test_worker_environment_names_real_settings(compose: dict) -> None:
    fields = {f"INTEREST_{name.upper()}" for name in Settings.model_fields}
    readme = (REPO / "README.md").read_text() + (REPO / "docs" / "settings.md").read_text()
    for svc in ("worker", "worker-gpu"):
        env = compose["services"][svc]["environment"]
        assert set(env) <= fields, f"unknown settings in {svc}: {set(env) - fields}"
        for name in env:
            assert name in readme, f"{name} is not documented in the README or docs/settings.md"
    assert compose["services"]["worker"]["environment"]["INTEREST_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert re.match(r"redis://redis:6379", compose["services"]["worker"]["environment"]["INTEREST_REDIS_URL"])


# --- the Kafka image, Prometheus and Grafana --------------------------------------------------------------------------

POM = REPO / "deps" / "kafka" / "pom.xml"
PROMETHEUS_YML = REPO / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "interest-stream.json"

# Prefixes of the metric names the dashboard and Prometheus config may use; a metric-like name with another prefix
# fails test_promql_names_have_a_known_prefix, so a new prefix has to be added here (and checked below) on purpose.
METRIC_PREFIXES = ("interest_",)
# PromQL words that precede "(" only after a label list or not at all (aggregations: `sum by (x) (...)`), keywords,
# and literals; function names are recognised by the "(" that follows them.
PROMQL_WORDS = frozenset(
    {
        *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
        *("bottomk", "topk", "quantile", "limitk", "limit_ratio"),
        *("by", "without", "on", "ignoring", "group_left", "group_right"),
        *("bool", "and", "or", "unless", "offset", "inf", "nan"),
    }
)


def _kafka_version_from_pom() -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    assert version is not None and version.text, f"no kafka.version property in {POM}"
    return version.text.strip()


def test_kafka_image_is_the_tested_broker_version(compose: dict) -> None:
    image = compose["services"]["kafka"]["image"]
    name, _, tag = image.rpartition(":")
    assert name == "apache/kafka", image
    assert tag == _kafka_version_from_pom(), f"{image} is not the broker the tests run ({POM})"


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> host path (or volume name) of a service's volumes, as `docker-compose config` prints them."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v["source"]
        else:
            source, target = str(v).split(":")[:2]
            out[target] = source
    return out


def test_kafka_single_node_settings(compose: dict) -> None:
    kafka = compose["services"]["kafka"]
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env, "Kafka 4 runs KRaft only"
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR",
    ):
        assert env.get(name) == "1", f"{name} must be 1 on a single node"
    # the image's default log.dirs (/tmp/kraft-combined-logs) is not on the volume: the topics would not persist
    mounts = _mounts(kafka)
    assert mounts.get(env["KAFKA_LOG_DIRS"]) == "kafka-data", "Kafka's log.dirs is not on the kafka-data volume"


def _exposed_metric_names() -> set[str]:
    """Every sample name the worker's /metrics can show, from the collectors streams.core.metrics.Metrics registers."""
    registry = CollectorRegistry()
    Metrics(registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def _promql_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, aggregations, keywords or label names)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries (Grafana's $__rate_interval among them)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # other Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", e):
        if m.group() in PROMQL_WORDS or e[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))  # rows can hold their panels
    return out


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _panels(_dashboard()["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for var in _dashboard().get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            exprs.append(query)
    return exprs


def _strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _prometheus_config() -> dict:
    return yaml.safe_load(PROMETHEUS_YML.read_text())


def _prometheus_metric_names() -> set[str]:
    """Prefixed names anywhere in prometheus.yml (relabel rules, ...) and the metrics its rule files' exprs select."""
    config = _prometheus_config()
    prefixes = "|".join(re.escape(p) for p in METRIC_PREFIXES)
    names = {m for s in _strings(config) for m in re.findall(rf"(?<![\w:])(?:{prefixes})[\w:]*", s)}
    for pattern in config.get("rule_files", []):
        files = sorted(PROMETHEUS_YML.parent.glob(Path(pattern).name))
        assert files, f"rule file {pattern} of prometheus.yml is not in {PROMETHEUS_YML.parent}"
        for f in files:
            for group in yaml.safe_load(f.read_text()).get("groups", []):
                for rule in group.get("rules", []):
                    names |= _promql_names(rule["expr"])
    return names


def test_promql_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (stage, le) (rate(interest_batch_stage_seconds_bucket{stage!="x"}'
        "[$__rate_interval]))) / on (instance) group_left sum without (reason) (interest_dead_letters_total) "
        "> bool 1e3 and interest_users_cached offset 5m"
    )
    assert _promql_names(expr) == {
        "interest_batch_stage_seconds_bucket",
        "interest_dead_letters_total",
        "interest_users_cached",
    }


def test_promql_names_have_a_known_prefix() -> None:
    exprs = _dashboard_exprs()
    assert exprs, "the dashboard has no PromQL expressions"
    for expr in exprs:
        for name in _promql_names(expr):
            assert name.startswith(METRIC_PREFIXES), f"{name!r} in {expr!r}: add its prefix to METRIC_PREFIXES"


def test_dashboard_and_prometheus_use_only_exposed_metrics() -> None:
    exposed = _exposed_metric_names()
    used = {name for expr in _dashboard_exprs() for name in _promql_names(expr)} | _prometheus_metric_names()
    missing = sorted(used - exposed)
    assert not missing, (
        f"metrics used by the dashboard or prometheus.yml but not defined in streams/core/metrics.py: {missing}"
    )


def test_prometheus_scrapes_the_worker_metrics_port(compose: dict) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"]), "pin the Prometheus version"
    assert 9090 in _host_ports(prometheus)
    assert _mounts(prometheus).get("/etc/prometheus/prometheus.yml") == str(PROMETHEUS_YML)
    config = _prometheus_config()
    targets = {
        target: job
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    for svc in ("worker", "worker-gpu"):
        port = int(services[svc]["environment"]["INTEREST_METRICS_PORT"])
        job = targets.get(f"{svc}:{port}")
        assert job is not None, f"prometheus.yml does not scrape {svc}:{port} (INTEREST_METRICS_PORT in compose)"
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"


def _provisioning(kind: str) -> list[dict]:
    """The entries (datasources, providers) of Grafana's provisioning files of one kind (.yml and .yaml, as Grafana)."""
    folder = GRAFANA / "provisioning" / kind
    files = sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")])
    assert files, f"nothing in {folder}"
    key = {"datasources": "datasources", "dashboards": "providers"}[kind]
    return [entry for f in files for entry in yaml.safe_load(f.read_text()).get(key, [])]


def _prometheus_datasource() -> dict:
    (ds,) = [ds for ds in _provisioning("datasources") if ds["type"] == "prometheus"]
    return ds


def test_grafana_provisioning(compose: dict) -> None:
    grafana = compose["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"]), "pin the Grafana version"
    assert 3000 in _host_ports(grafana)
    assert str(grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = _mounts(grafana)
    assert mounts.get("/etc/grafana/provisioning") == str(GRAFANA / "provisioning")
    assert _prometheus_datasource()["url"] == "http://prometheus:9090"
    paths = {p["options"]["path"] for p in _provisioning("dashboards")}
    assert any(mounts.get(path) == str(DASHBOARD.parent) for path in paths), (
        f"no dashboard provider loads {DASHBOARD.parent} (provider paths {paths}, grafana mounts {mounts})"
    )
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert mounts.get(str(Path(home).parent)) == str(DASHBOARD.parent), f"{home} is not in the mounted dashboards"
        assert (DASHBOARD.parent / Path(home).name).exists(), f"no {Path(home).name} in {DASHBOARD.parent}"


def test_dashboard_datasources_are_the_provisioned_one() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 42
    uid = _prometheus_datasource()["uid"]
    panels = _panels(dashboard["panels"])
    assert panels
    for p in panels:
        if p.get("type") == "row" and "datasource" not in p:
            continue
        assert p["datasource"]["uid"] == uid, f"panel {p['title']!r}: datasource {p['datasource']}, provisioned {uid!r}"
        for t in p.get("targets", []):
            if "datasource" in t:
                assert t["datasource"]["uid"] == uid, f"panel {p['title']!r}, target {t['refId']}: {t['datasource']}"
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"

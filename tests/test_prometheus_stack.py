"""Prometheus on real parts: the compose stack's Prometheus config, alert rules and Grafana
dashboard, checked by Debian's ``promtool`` and run by its ``prometheus`` against an embedded stack.

The stack (2 workers, Flower) runs a few dozen requests under weather: requests the provider
answers with 429s (then cancelled), a batch whose every call fails with a 500 (breakers open,
routes fall back), streamed calls (time to first chunk) and a webhook whose receiver is gone
(deliveries fail for good). A ``prometheus`` on a free loopback port scrapes the API, each
worker and Flower every second under the compose config's job names, and loads the real rules
file. Then every PromQL expression of every dashboard panel and every alert rule's query must
return data: a renamed metric or label leaves a panel blank or a rule watching nothing, and
nothing else would tell.

How an alert is checked: each rule's expr is written ``<query> <comparison> <number>``
(``... > 60``, ``up{...} == 0``); the comparison is stripped and the query must return data (the
comparison itself holds only under trouble). Prometheus must also report every rule evaluated
with health "ok". Grafana's variables are replaced by values (``GRAFANA_VARIABLES``).

Not checked here: the compose ``redis`` job (redis_exporter is not run), so the panels in
``REDIS_EXPORTER_PANELS`` are skipped; each of them reads only ``job="redis"``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from broker_config.settings import Settings
from db.budgets import set_budget
from db.engine import get_database
from headrace.embedded import ManagedProcess, free_port
from headrace.stack import DEFAULT_CONFIG, EmbeddedStack
from tests.test_end_to_end import wait_ended

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RULES = ROOT / "deploy/prometheus/rules/headrace.yml"
RULES_UNIT_TESTS = Path(__file__).parent / "prometheus/headrace_rules_test.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/headrace.json"

# The compose config's jobs this test scrapes under the same names; "redis" is redis_exporter's.
JOBS = ("headrace-api", "headrace-workers", "flower")
REDIS_EXPORTER_PANELS = frozenset({"Broker Redis memory", "Broker Redis clients and commands"})
# What Grafana would put in; any other "$" left in an expression fails the test.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "10m", "$__interval": "15s"}
# A rule's trailing comparison with a number: what is stripped to leave its query.
COMPARISON = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?-?[0-9.]+(e[-+]?[0-9]+)?\s*$")

# openai-mini (the fast route's first deployment) streams, for time to first chunk; the route
# "trickle" has room for 2 requests a minute, so that more wait parked in the delay queue.
CONFIG_TEMPLATE = (
    DEFAULT_CONFIG.replace('model = "gpt-4o-mini"\n', 'model = "gpt-4o-mini"\nstream = true\n')
    + """
[[deployments]]
name = "openai-trickle"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{sim}/v1"
api_key_env = "{key_env}"
rpm = 2
tpm = 2000000

[[routes]]
name = "trickle"
deployments = ["openai-trickle"]

[[routes]]
name = "cached"
deployments = ["openai-mini"]
cache = "exact"
"""
)
SIMULATOR_ARGS = ("--latency-ms", "10", "--latency-jitter-ms", "5", "--seed", "7")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus)")
    return path


def promtool(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        [binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def rule_query(expr: str) -> str:
    """The query of a rule's ``<query> <comparison> <number>``."""
    query, n = COMPARISON.subn("", expr.strip())
    assert n == 1, f"not '<query> <comparison> <number>': {expr}"
    return query


def panel_queries() -> dict[str, list[str]]:
    """Each panel's expressions, by title, with Grafana's variables replaced."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        exprs = [target["expr"] for target in panel["targets"]]
        for name, value in GRAFANA_VARIABLES.items():
            exprs = [expr.replace(name, value) for expr in exprs]
        assert all("$" not in expr for expr in exprs), f"a variable the test does not know: {exprs}"
        assert panel["title"] not in queries, f"two panels titled {panel['title']!r}"
        queries[panel["title"]] = exprs
    return queries


def compose_jobs() -> list[str]:
    return [job["job_name"] for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]]


def test_the_compose_config_and_the_rules_pass_promtool() -> None:
    """promtool accepts the compose config (its DNS names need not resolve) and the rules."""
    assert "SUCCESS" in promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert "SUCCESS" in promtool("check", "rules", str(RULES))
    assert compose_jobs() == [*JOBS, "redis"]


def test_each_alert_fires_after_its_for_and_not_before() -> None:
    """The rules' own unit tests (promtool test rules) pass."""
    assert "SUCCESS" in promtool("test", "rules", RULES_UNIT_TESTS.name, cwd=RULES_UNIT_TESTS.parent)


def test_every_alert_has_a_severity_a_summary_a_description_and_a_checkable_query() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "HeadraceInteractiveQueueStale",
        "HeadraceBreakerOpen",
        "HeadraceProviderRateLimited",
        "HeadraceWebhookDeliveriesFailing",
        "HeadraceWorkerDown",
        "HeadraceApiDown",
        "HeadraceStateRedisUnreadable",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        rule_query(rule["expr"])


def test_compose_wires_prometheus_grafana_and_the_workers_to_these_files() -> None:
    """The compose file mounts these files where their configs look, and workers serve metrics
    where Prometheus looks for them."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    prometheus_volumes = compose["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus_volumes
    assert "./deploy/prometheus/rules:/etc/prometheus/rules:ro" in prometheus_volumes
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    workers = next(job for job in config["scrape_configs"] if job["job_name"] == "headrace-workers")
    assert workers["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": Settings().worker_metrics_port, "refresh_interval": "15s"}
    ]
    assert compose["worker"]["environment"]["HEADRACE_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert compose["redis-exporter"]["environment"]["REDIS_ADDR"] == "redis://redis:6379"

    grafana = compose["grafana"]["volumes"]
    provisioning = ROOT / "deploy/grafana/provisioning"
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    (provider,) = yaml.safe_load((provisioning / "dashboards/headrace.yml").read_text())["providers"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    used = {p["datasource"]["uid"] for p in panels} | {
        t["datasource"]["uid"] for p in panels for t in p["targets"]
    }
    assert used == {datasource["uid"]}


def test_the_skipped_panels_read_redis_exporter_only() -> None:
    queries = panel_queries()
    assert queries.keys() >= REDIS_EXPORTER_PANELS
    for title in REDIS_EXPORTER_PANELS:
        assert all('job="redis"' in expr for expr in queries[title]), title


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    binary("prometheus")
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("prometheus-stack"),
        config_template=CONFIG_TEMPLATE,
        workers=2,
        worker_concurrency=8,
        with_flower=True,
        simulator_args=SIMULATOR_ARGS,
        extra_env={
            "HEADRACE_BACKOFF_BASE_S": "0.05",
            "HEADRACE_BACKOFF_MAX_S": "0.2",
            "HEADRACE_BREAKER_CONSECUTIVE_FAILURES": "5",
            # A webhook to loopback is allowed here, and gives up after one retry.
            "HEADRACE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
            "HEADRACE_WEBHOOK_RETRY_SCHEDULE_S": "0.5",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _netloc(url: str) -> str:
    return urlparse(url).netloc


@pytest.fixture(scope="module")
def prometheus(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on a free loopback port, scraping the stack every second under the compose
    config's job names, with the real rules loaded; its base URL."""
    home = tmp_path_factory.mktemp("prometheus")
    targets = {
        "headrace-api": [_netloc(stack.api_url)],
        "headrace-workers": [_netloc(url) for url in stack.worker_metrics_urls.values()],
        "flower": [_netloc(stack.flower_url)],
    }
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets[job]}]} for job in JOBS],
    }
    config_path = home / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = ManagedProcess(
        f"prometheus-{port}",
        [
            binary("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log_dir=home,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{url}/-/ready", timeout_s=60)
        yield url
    finally:
        proc.stop()


def query(prometheus: str, expr: str) -> list[Any]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result: list[Any] = body["data"]["result"]
    return result


def wait_for(check: Callable[[], object], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.5)


def _value(prometheus: str, expr: str) -> float:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else 0.0


def _same(n: int, prefix: str, route: str) -> list[dict[str, object]]:
    body = {
        "model": route,
        "messages": [{"role": "user", "content": "Why?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    return [{"custom_id": f"{prefix}-{i}", "body": body} for i in range(n)]


def _lines(n: int, prefix: str, route: str, text: str = "") -> list[dict[str, object]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "body": {
                "model": route,
                "messages": [{"role": "user", "content": f"{text}Question {i}: " + "why? " * (i % 7)}],
                "max_tokens": 8 + i % 16,
            },
        }
        for i in range(n)
    ]


@pytest.mark.slow
def test_every_panel_and_every_alert_query_returns_data_from_a_real_run(
    stack: EmbeddedStack, prometheus: str, http: httpx.Client
) -> None:
    targets_up = f"{prometheus}/api/v1/targets"

    def every_target_up() -> bool:
        active = httpx.get(targets_up, timeout=10).json()["data"]["activeTargets"]
        return len(active) == 2 + len(stack.worker_metrics_urls) and all(t["health"] == "up" for t in active)

    wait_for(every_target_up, timeout_s=60, what="every target up")

    # A budget far from its limit: the API's budget gauges have a series to show.
    set_budget(get_database(stack.env["HEADRACE_DATABASE_URL"]), "demo", "monthly", limit_usd=1000)
    gone = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: the delivery fails for good
    batches = [
        ({"feature": "search"}, "interactive", _lines(30, "s", "fast"), gone),
        ({"feature": "chat"}, "bulk", _lines(30, "c", "smart"), None),
        # Ten identical questions at temperature 0: one call, the rest coalesced or cached.
        ({"feature": "faq"}, "default", _same(10, "q", "cached"), None),
        # Every call of these fails with a 500: both deployments of "smart" trip their breakers.
        ({"feature": "broken"}, "default", _lines(10, "x", "smart", "[[sim:status=500]] "), None),
        # The provider answers every call of these with a 429 (a plain limit would meet few or
        # none: the bucket learns it from the provider's headers). A 429 is trouble that passes,
        # so they would wait for their window: cancelled once Prometheus has seen 429s.
        (
            {"feature": "limited"},
            "interactive",
            _lines(3, "l", "fast", "[[sim:status=429,retry_after=0.2]] "),
            None,
        ),
        # Room for 2 a minute: the others wait in the delay queue (cancelled once seen there).
        ({"feature": "trickle"}, "bulk", _lines(5, "t", "trickle"), None),
    ]
    batch_ids = []
    for metadata, priority, lines, webhook_url in batches:
        body = {"requests": lines, "priority": priority, "metadata": metadata, "webhook_url": webhook_url}
        response = http.post("/v1/batches", json=body)
        assert response.status_code == 201, response.text
        batch_ids.append(response.json()["id"])
    wait_for(
        lambda: _value(prometheus, "sum(headrace_provider_rate_limited_total)") > 0,
        timeout_s=120,
        what="Prometheus sees 429s",
    )
    wait_for(
        lambda: _value(prometheus, "sum(headrace_requests_parked_total)") > 0,
        timeout_s=120,
        what="Prometheus sees requests parked for room",
    )
    for batch_id in batch_ids[-2:]:
        assert http.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
    wait_ended(http, batch_ids, timeout_s=180)
    ended_at = time.time()

    # Prometheus has scraped every target since the run ended, and seen the webhook given up.
    wait_for(
        lambda: _value(prometheus, "min(timestamp(up))") > ended_at,
        timeout_s=60,
        what="every target scraped after the run",
    )
    wait_for(
        lambda: _value(prometheus, 'sum(headrace_webhook_deliveries_total{outcome="failed"})') >= 1,
        timeout_s=60,
        what="Prometheus sees the webhook delivery failed",
    )
    assert _value(prometheus, 'sum(headrace_breaker_transitions_total{transition="opened"})') >= 1

    empty = []
    for title, exprs in panel_queries().items():
        if title in REDIS_EXPORTER_PANELS:
            continue
        empty += [f"panel {title!r}: {expr}" for expr in exprs if not query(prometheus, expr)]
    for rule in alert_rules():
        expr = rule_query(rule["expr"])
        if not query(prometheus, expr):
            empty.append(f"alert {rule['alert']}: {expr}")
    assert not empty, "queries that returned no data:\n" + "\n".join(empty)

    # The rules as Prometheus runs them: each evaluated, none in error.
    def rules_evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    wait_for(
        lambda: all(r["health"] != "unknown" for r in rules_evaluated()),
        timeout_s=30,
        what="every rule evaluated",
    )
    evaluated = rules_evaluated()
    assert {r["name"] for r in evaluated} == {r["alert"] for r in alert_rules()}
    assert [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"] == []

    # One alert holds without waiting out a `for`: the webhook that failed for good.
    def firing() -> set[str]:
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

    wait_for(
        lambda: "HeadraceWebhookDeliveriesFailing" in firing(),
        timeout_s=30,
        what="the webhook alert firing",
    )

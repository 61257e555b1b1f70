"""The shipped alerts and dashboard check out: promtool validates deploy/prometheus/alerts.yaml
and runs its unit tests (alerts_test.yaml); the Grafana dashboard parses, every panel queries
something in valid PromQL; and every metric that the alerts and the dashboard select is one
that a real sidecar or a real control plane exports, read from their /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_prometheus import whoami
from tests.processes import Backend, ControlPlane, Sidecar, eventually

pytestmark = pytest.mark.slow
DEPLOY = Path(__file__).parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "meshlet.json"

#: metrics of Prometheus's own that the rules may use
PROMETHEUS_OWN = {"up"}
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
#: PromQL string literals (label values), and Grafana's variables ($service, ${x})
LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
VARIABLE = re.compile(r"\$\{?\w+\}?")
#: what Grafana puts in place of its variables, so that promtool can parse a panel's query
STAND_INS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$service": ".+"}


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression selects: the identifiers in it (label values and
    Grafana variables taken out first) that are `meshlet_*`, `up`, or a recording rule's
    `level:metric:operations` name. Functions, keywords and label names are none of these."""
    bare = VARIABLE.sub(" ", LITERAL.sub('""', expr))
    return {
        word
        for word in IDENTIFIER.findall(bare)
        if word.startswith("meshlet_") or word in PROMETHEUS_OWN or ":" in word.strip(":")
    }


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but the rows (which only group panels), including those in collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        found += panel.get("panels", [])
        if panel["type"] != "row":
            found.append(panel)
    return found


def dashboard_queries(board: dict[str, Any]) -> dict[str, str]:
    """{where: PromQL} for every panel target and every query template variable."""
    queries = {
        f"panel {panel['title']!r} target {target['refId']}": target["expr"]
        for panel in panels(board)
        for target in panel["targets"]
    }
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries[f"variable {variable['name']}"] = (
                query["query"] if isinstance(query, dict) else query
            )
    return queries


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} not found: apt-get install prometheus (.ci/run does)"
    return found


def run(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# -- what the processes export ----------------------------------------------------------------


def exported(text: str) -> set[str]:
    """The metric names a /metrics body exposes, as Prometheus stores them: its samples'
    names (``_total``, ``_bucket``, ``_sum`` and ``_count`` included)."""
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        body: bytes = r.read()
        return body.decode()


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The /metrics bodies of a control plane and of a sidecar connected to it (with an access
    log and its app's health checked) that has served requests, 2xx and 5xx, and retried."""
    tmp = tmp_path_factory.mktemp("exposition")
    started: list[ControlPlane | Backend | Sidecar] = []
    try:
        cp = ControlPlane(tmp / "logs", "--store", "memory", "--debounce-quiet", "0.05")
        started.append(cp)
        app = Backend(tmp / "logs", "items")
        started.append(app)
        sidecar = Sidecar(
            tmp / "logs",
            "--service", "items", "--app", f"http://127.0.0.1:{app.port}",
            "--control-plane", cp.url, "--advertise", "127.0.0.1",
            "--state-dir", str(tmp / "state"), "--access-log", str(tmp / "access.log"),
            env=cp.sidecar_env("items"),
        )  # fmt: skip
        started.append(sidecar)
        # it calls its own service: outbound, then inbound to the app, on one sidecar
        eventually(lambda: whoami(sidecar, "items") == 200, timeout=20, what="items routed")
        for _ in range(5):
            assert whoami(sidecar, "items") == 200
        app.toggle_failing(True)  # the app answers 503 from now on: retried
        assert whoami(sidecar, "items") == 503
        yield {
            "sidecar": fetch(f"http://127.0.0.1:{sidecar.ports['metrics']}/metrics"),
            "control plane": fetch(f"{cp.url}/metrics"),
        }
    finally:
        for process in reversed(started):
            process.kill()


@pytest.fixture(scope="module")
def exports(exposition: dict[str, str]) -> set[str]:
    return set.union(*(exported(text) for text in exposition.values())) | PROMETHEUS_OWN


# -- the alerts -------------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    assert "SUCCESS" in run(tool("promtool"), "check", "rules", str(RULES))
    assert "SUCCESS" in run(
        tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent
    )


def test_every_alert_says_how_bad_and_what_happened() -> None:
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 8
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    test_cases = [case for test in tested for case in test["alert_rule_test"]]
    for alert in alerts:
        name = alert["alert"]
        assert alert.get("for"), name
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        annotations = alert["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        if name != "MeshletControlPlaneAbsent":  # absent() leaves no labels to name
            assert "{{ $labels." in annotations["summary"] + annotations["description"], name
        cases = [case for case in test_cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in cases), f"{name}: no test where it fires"
        assert any(not case["exp_alerts"] for case in cases), f"{name}: no test where it does not"


def test_the_rules_select_only_metrics_the_mesh_exports(exports: set[str]) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(rule.get("alert") or rule["record"])
    assert recorded <= used.keys(), "recording rules nothing uses"
    unknown = {n: where for n, where in used.items() if n not in exports | recorded}
    assert not unknown, f"not exported: {unknown}"
    # the families the alerts are about
    assert {
        "meshlet_requests_total",
        "meshlet_connected_sidecars",
        "meshlet_control_plane_connected",
        "meshlet_table_age_seconds",
        "meshlet_push_convergence_seconds_bucket",
        "meshlet_protection_active",
        "up",
    } <= used.keys()


# -- the dashboard ----------------------------------------------------------------------------


def test_the_dashboard_has_its_variables_and_every_panel_a_query() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    service = variables["service"]
    assert service["definition"] == "label_values(meshlet_requests_total, service)"
    assert service["multi"]
    assert service["includeAll"]
    found = panels(board)
    assert len(found) >= 20
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"]), "panel ids repeat"
    for panel in found:
        assert panel["targets"], f"{panel['title']}: no query"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: an empty query"


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's, Grafana's variables stood in for."""
    queries = dashboard_queries(dashboard())
    recorded = []
    for i, (where, expr) in enumerate(queries.items()):
        if where.startswith("variable"):
            match = re.fullmatch(r"label_values\((.+), *(\w+)\)", expr)
            assert match, f"{where}: {expr}"
            expr = match.group(1)
        for variable, stand_in in STAND_INS.items():
            expr = expr.replace(variable, stand_in)
        assert "$" not in expr, f"{where}: a variable the test does not know: {expr}"
        recorded.append({"record": f"dashboard_query_{i}", "expr": expr})
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    run(tool("promtool"), "check", "rules", str(path))


def test_the_dashboard_selects_only_metrics_the_mesh_exports(exports: set[str]) -> None:
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_queries(dashboard()).items():
        names = metric_names(expr)
        assert names, f"{where} selects no meshlet metric: {expr}"
        for name in names:
            used.setdefault(name, set()).add(where)
    unknown = {n: where for n, where in used.items() if n not in exports}
    assert not unknown, f"not exported: {unknown}"
    # what the dashboard is for
    assert {
        "meshlet_requests_total",
        "meshlet_request_duration_seconds_bucket",
        "meshlet_upstream_retries_total",
        "meshlet_retries_suppressed_total",
        "meshlet_retries_over_limit_total",
        "meshlet_retries_unsent_total",
        "meshlet_hedges_total",
        "meshlet_outlier_ejections_total",
        "meshlet_push_convergence_seconds_bucket",
        "meshlet_protection_active",
        "meshlet_listener_refused_total",
        "meshlet_listener_timeouts_total",
        "meshlet_listener_backpressure_total",
        "meshlet_listener_opaque_streams_total",
    } <= used.keys()


def test_the_metric_name_extractor() -> None:
    assert metric_names(
        'sum by (service, le) (rate(meshlet_request_duration_seconds_bucket{service=~"$service",'
        'code="meshlet_not_a_metric"}[$__rate_interval])) / on (job) group_left () up'
    ) == {"meshlet_request_duration_seconds_bucket", "up"}
    assert metric_names("service:meshlet_requests_errors:ratio_rate5m > (14.4 * 0.001)") == {
        "service:meshlet_requests_errors:ratio_rate5m"
    }


def test_the_exposition_was_read_from_live_processes(exposition: dict[str, str]) -> None:
    """The names the checks above compare against come from real traffic, not empty families."""
    sidecar = exported(exposition["sidecar"])
    assert {
        "meshlet_requests_total",
        "meshlet_request_duration_seconds_bucket",
        "meshlet_control_plane_connected",
        "meshlet_app_healthy",
        "meshlet_access_log_dropped_total",
    } <= sidecar
    assert 'service="items"' in exposition["sidecar"]
    assert 'code="5xx"' in exposition["sidecar"]
    control_plane = exported(exposition["control plane"])
    assert {"meshlet_connected_sidecars", "meshlet_push_convergence_seconds_bucket"} <= (
        control_plane
    )
    assert not sidecar & {"meshlet_connected_sidecars", "meshlet_registry_instances"}, (
        "the alerts tell the control plane by metrics only it exports"
    )

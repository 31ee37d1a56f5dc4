"""The monitoring deployment files (deploy/prometheus, deploy/grafana, compose's `monitoring`
profile) agree with each other and with what the service exports: the rules pass promtool's
check and their unit tests, every alert is tested, the dashboard is a well-formed Grafana
dashboard whose queries parse and name only series and labels that exist (exported by a real
server serving two versions and a shadow, or recorded by the rules), every ratio is computed per
model and version, and compose wires Prometheus to every replica and Grafana to Prometheus.
Needs promtool (Debian's `prometheus` package; `make test` installs it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RULES = PROMETHEUS / "rules" / "mmoe.yml"
RULE_TESTS = PROMETHEUS / "tests" / "mmoe_test.yml"
DASHBOARD = GRAFANA / "dashboards" / "mmoe.json"
SERVER_PORT = 8000
# A value for each dashboard variable, to make its queries plain PromQL.
VARIABLES = {"model": "ranker", "version": "1", "task": "ctr"}
# Labels every series has in Prometheus without the service exporting them (the scrape's).
TARGET_LABELS = {"instance", "job"}
# Series the rules and dashboard watch that another part of the service exports, not yet the
# server these tests start: name -> its labels.
# The recorded series that are per model and version (and their alerts): every `by` and `on`
# of their expressions keeps both labels, so that no ratio mixes two versions' traffic.
PER_VERSION = re.compile(r"mmoe:(feature|gate|score|shadow)_[\w:]+")
# What a PromQL expression may name besides series: functions, keywords, aggregations.
PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "by",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "rate",
    "increase",
    "histogram_quantile",
    "clamp_min",
    "abs",
    "scalar",
    "min_over_time",
    "max_over_time",
    "label_values",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: the alert rules cannot be checked. Install it "
            "(apt-get install prometheus; `make test` does) or set PROMTOOL=/path/to/promtool"
        )
    return path


def run(promtool: str, *args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def substitute(expr: str) -> str:
    """`expr` with the dashboard's variables replaced by a value."""
    return re.sub(r"\$(\w+)", lambda m: VARIABLES[m.group(1)], expr)


def dashboard_targets(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for p in panels(dash) for t in p.get("targets", [])]


def dashboard_queries(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard, its variables replaced by a value."""
    return [substitute(t["expr"]) for t in dashboard_targets(dash)]


def series_names(expr: str) -> set[str]:
    """The series an expression selects (metric names and recorded rule names)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values and quoted strings
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\b(by|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"e\d*", n)}


def grouping_labels(expr: str) -> list[list[str]]:
    """The label lists of an expression's `by` and `on` clauses: the labels it keeps."""
    clauses = re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr)
    return [[label.strip() for label in c.split(",") if label.strip()] for c in clauses]


def label_names(expr: str) -> set[str]:
    """The labels an expression names: in its clauses (by, on, group_left, ...) and matchers."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    names: set[str] = set()
    clauses = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for clause in re.findall(clauses, expr):
        names.update(n.strip() for n in clause.split(",") if n.strip())
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return names


# ---------------------------------------------------------------------- Prometheus rules


def test_rules_and_config_pass_promtool_check(promtool: str) -> None:
    out = run(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in out
    out = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert f"{len(rules())} rules found" in out, "prometheus.yml does not load rules/mmoe.yml"


def test_rule_unit_tests_pass(promtool: str) -> None:
    out = run(promtool, "test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts <= fired, f"alerts without a firing test: {sorted(alerts - fired)}"
    # What the issues ask for, at least.
    assert {
        "MmoeFeatureOOVRateHigh",
        "MmoeExpertUnused",
        "MmoeScoreMeanShift",
        "MmoeShadowDrift",
        "MmoeItemMissShareHigh",
        "MmoeReplicasServeDifferentModels",
    } <= alerts


def test_every_ratio_is_computed_per_model_and_version() -> None:
    per_version = [
        r
        for r in rules()
        if PER_VERSION.fullmatch(r.get("record", "")) or PER_VERSION.search(r["expr"])
    ]
    assert len(per_version) == 15
    for rule in per_version:
        name = rule.get("record") or rule["alert"]
        for labels in grouping_labels(rule["expr"]):
            assert {"model", "version"} <= set(labels), f"{name} groups by {labels}"
    # And so does the dashboard, wherever it groups a model-level series by more than `le`.
    for expr in dashboard_queries(dashboard()):
        if not any(
            s.startswith(("mmoe_feature", "mmoe_gate", "mmoe_score", "mmoe_shadow"))
            for s in series_names(expr)
        ):
            continue
        for labels in grouping_labels(expr):
            assert labels == ["le"] or {"model", "version"} <= set(labels), expr


def test_alert_thresholds_are_the_documented_ones() -> None:
    by_name = {r["alert"]: r for r in rules() if "alert" in r}
    oov = by_name["MmoeFeatureOOVRateHigh"]
    assert re.fullmatch(r"mmoe:feature_oov_ratio:\w+ > 3", oov["expr"].strip())
    assert oov["for"] == "10m"
    assert "< 0.1" in by_name["MmoeExpertUnused"]["expr"]
    drift = by_name["MmoeShadowDrift"]
    assert "p90:15m > 0.05" in drift["expr"] and "mean:15m < 0.8" in drift["expr"]
    assert drift["for"] == "15m" and "docs/experiments.md" in drift["annotations"]["description"]
    items = by_name["MmoeItemMissShareHigh"]
    assert re.fullmatch(r"mmoe:item_miss_share:5m > 0.05", items["expr"].strip())
    assert items["for"] == "10m"
    assert by_name["MmoeReplicasServeDifferentModels"]["for"] == "15m"
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    for name in by_name:
        assert name in doc, f"docs/monitoring.md does not say what to do about {name}"


# ---------------------------------------------------------------------- Grafana dashboard


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    dash = dashboard()
    for key, kind in {
        "uid": str,
        "title": str,
        "schemaVersion": int,
        "panels": list,
        "time": dict,
        "templating": dict,
        "annotations": dict,
        "version": int,
    }.items():
        assert isinstance(dash.get(key), kind), key
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    assert dash["schemaVersion"] >= 36  # the datasource-as-object era
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels(dash):
        assert p["type"] in {"row", "timeseries", "heatmap", "stat"}, p["type"]
        assert p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        assert g["y"] >= 0 and g["h"] > 0, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']!r} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    (source,) = provisioned
    assert source["type"] == "prometheus"
    dash = dashboard()
    uses = [p["datasource"] for p in panels(dash) if p["type"] != "row"]
    uses += [t["datasource"] for p in panels(dash) for t in p.get("targets", [])]
    uses += [v["datasource"] for v in dash["templating"]["list"] if "datasource" in v]
    for ds in uses:
        assert ds == {"type": "prometheus", "uid": source["uid"]}


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: one recording rule per dashboard query.
    queries = [q for q in dashboard_queries(dashboard()) if not q.startswith("label_values")]
    check = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": q} for i, q in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(check))
    assert f"{len(queries)} rules found" in run(promtool, "check", "rules", str(path))


def exported_series(text: str) -> dict[str, set[str]]:
    """The sample names a scrape can have, from its families (a counter with no samples yet
    still declares its type), each with the labels its samples have."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gauge": [""],
    }
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in suffixes.get(family.type, [""]):
            names.setdefault(family.name + s, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture
def experiment_server(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> ServerProcess:
    """A server of a model repository: ranker 1 answering, ranker 2 scoring every request in
    shadow (docs/experiments.md), so that every model-level series has samples."""
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        (repo / "ranker" / version).mkdir(parents=True)
        shutil.copy(tiny_onnx, repo / "ranker" / version / "model.onnx")
    (repo / "routing.yaml").write_text(
        "default: ranker\n"
        "models:\n"
        "  ranker:\n"
        '    arms: {"1": 100}\n'
        '    shadow: {version: "2", percent: 100}\n'
    )
    return start_server(tmp_path / "unused.onnx", env={"MMOE_MODEL_REPOSITORY": str(repo)})


def scrape_after_a_shadowed_request(server: ServerProcess) -> str:
    body = {
        "candidates": {"user_id": ["u1", "u2", "u3", "u4"], "category": ["c1", "c2", "c1", "c3"]}
    }
    answer = httpx.post(f"{server.url}/predict", json=body)
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the shadow scores its copy after the answer has left
        text = httpx.get(f"{server.url}/metrics").text
        if "mmoe_shadow_rank_correlation_count{" in text:
            return text
        time.sleep(0.1)
    raise AssertionError("the shadow did not score the request's copy")


@pytest.mark.slow
def test_dashboard_and_rules_name_only_series_and_labels_that_exist(
    experiment_server: ServerProcess,
) -> None:
    exported = exported_series(scrape_after_a_shadowed_request(experiment_server))
    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}
    known = set(exported) | set(recorded) | {"up"}  # `up`: Prometheus's own, per scrape target
    queries = dashboard_queries(dashboard()) + [r["expr"] for r in rules()]
    for query in queries:
        unknown = series_names(query) - known
        assert not unknown, f"{unknown} in {query!r}: neither exported nor recorded"

    def labels_of(name: str) -> set[str]:
        """The labels `name` can have: its samples', or (recorded) its inputs'."""
        if name in recorded:
            return set().union(*(labels_of(n) for n in series_names(recorded[name])))
        return exported.get(name, set()) | TARGET_LABELS

    # Every label a query groups, joins or matches on, and every one a legend shows, is one
    # of the series it names: a label misspelt, or one its series lack, would group nothing.
    for target in dashboard_targets(dashboard()):
        query = substitute(target["expr"])
        have = set().union(*(labels_of(n) for n in series_names(query)))
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        assert label_names(query) | legend <= have, f"{target['legendFormat']!r}: {query!r}"
    for rule in rules():
        have = set().union(*(labels_of(n) for n in series_names(rule["expr"])))
        missing = label_names(rule["expr"]) - have
        assert not missing, f"{missing} in {rule['expr']!r}: no such label on its series"
        shown = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule.get("annotations", {}))))
        assert shown <= have, f"{rule.get('alert')} shows labels {shown - have}"

    # Every series the monitoring exports is on the dashboard.
    named = set().union(*(series_names(q) for q in dashboard_queries(dashboard())))
    for metric in (
        "mmoe_feature_reference_rate",
        "mmoe_gate_weight_reference",
        "mmoe_score_bucket",
        "mmoe_shadow_requests_total",
        "mmoe_item_lookups_total",
    ):
        assert metric in named
    used_by_rules = set().union(*(series_names(r["expr"]) for r in rules()))
    for metric in (
        "mmoe_feature_values_total",
        "mmoe_gate_weight_total",
        "mmoe_score_sum",
        "mmoe_shadow_score_difference_bucket",
        "mmoe_shadow_rank_correlation_sum",
        "mmoe_item_lookups_total",
    ):
        assert metric in used_by_rules
    # The model-level series of both versions, the shadow's under its own version.
    for metric in ("mmoe_score_count", "mmoe_runtime_seconds_count", "mmoe_feature_values_total"):
        assert {"model", "version"} <= exported[metric], metric
    assert {"model", "version", "shadow_version", "task"} <= exported[
        "mmoe_shadow_score_difference_bucket"
    ]


# -------------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of each bind mount (relative to the compose file)."""
    out = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith("."):
            out[container] = (ROOT / host).resolve()
    return out


def test_compose_starts_prometheus_and_grafana_only_under_the_monitoring_profile() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        assert services[name]["ports"], name
        for host in mounts(services[name]).values():
            assert host.exists(), f"{name} mounts {host}, which does not exist"
    # The default `up` is unchanged: nothing else joins the profile.
    others = {n for n, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert others == {"prometheus", "grafana"}


def test_prometheus_loads_the_rules_and_scrapes_every_server_replica() -> None:
    services = compose()["services"]
    prom = services["prometheus"]
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    mounted = mounts(prom)
    assert mounted[config_path] == PROMETHEUS / "prometheus.yml"
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    # Rule files are relative to the config file: the rules directory must be mounted there.
    config_dir = Path(config_path).parent
    for pattern in config["rule_files"]:
        rule_dir = str(config_dir / Path(pattern).parent)
        assert mounted[rule_dir] == RULES.parent, pattern
        assert list(RULES.parent.glob(Path(pattern).name))
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "mmoe"  # the alerts select up{job="mmoe"}
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    # Each replica by Docker's DNS, not the balancer (which would show one replica a scrape).
    assert sd["names"] == ["server"] and sd["type"] == "A"
    assert sd["port"] == SERVER_PORT
    assert str(SERVER_PORT) in [str(p) for p in services["server"]["expose"]]
    assert "server" in services["server-gpu"]["networks"]["default"]["aliases"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    mounted = mounts(grafana)
    assert mounted["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    source = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()  # type: ignore[union-attr]
    assert host == "prometheus" and host in services
    assert any(p.endswith(f":{port}") for p in services["prometheus"]["ports"])
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "mmoe.yml").read_text()
    )["providers"]
    assert mounted[provider["options"]["path"]] == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(provider["options"]["path"])
    assert (DASHBOARD.parent / Path(home).name).is_file()


def test_docs_commands_name_the_profile_and_ports() -> None:
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    assert "docker compose --profile monitoring up" in doc
    services = compose()["services"]
    for name, default in (("prometheus", "9090"), ("grafana", "3000")):
        (port,) = services[name]["ports"]
        assert f":-{default}}}" in port, port
        assert f"localhost:{default}" in doc

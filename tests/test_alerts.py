"""pwff's alerting rules (deploy/helm/pwff/files/alerts.yaml): `promtool check rules`, a `promtool test rules`
unit test of each alert (fires on the failure, stays quiet on a healthy namespace), and the chart's optional
PrometheusRule carrying exactly these rules.

promtool ships with Debian's prometheus package (scripts/ensure-system-packages.sh); missing, it is a failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_helm import CHART, RELEASE, Render, crd_validator, helm, render  # noqa: F401 (fixtures)

RULES = CHART / "files" / "alerts.yaml"

# One scenario per alert: series over 40 minutes at 1 m resolution, and when it must (not) fire. Namespace
# "sick" has the failure, "well" the healthy counterpart; only "sick" may alert.
SCENARIOS: dict[str, dict[str, Any]] = {
    "PwffNoWorkerConsuming": {
        "series": {
            # A job starts at 5 m everywhere but in "idle".
            'pwff_jobs_running{namespace="sick"}': "0x5 1x35",
            'pwff_tasks_processed_total{namespace="sick",outcome="done"}': "0x40",
            'pwff_jobs_running{namespace="gone"}': "0x5 1x35",  # no worker scraped at all: no processed series
            'pwff_jobs_running{namespace="well"}': "0x5 1x35",
            'pwff_tasks_processed_total{namespace="well",outcome="done"}': "0x5 0+1x35",
            # Tasks done until 20 m, then none: the workers stopped consuming later than the firing check.
            'pwff_jobs_running{namespace="late"}': "0x5 1x35",
            'pwff_tasks_processed_total{namespace="late",outcome="done"}': "0x5 0+1x15 15x20",
            'pwff_jobs_running{namespace="idle"}': "0x40",
            'pwff_tasks_processed_total{namespace="idle",outcome="done"}': "0x40",
        },
        "quiet_at": "15m",  # jobs have run 10 m: slow first tasks are no alarm
        "fires_at": "26m",  # 15 m of running jobs without a finished task, then 5 m pending
        "firing": [{"namespace": "sick"}, {"namespace": "gone"}],
    },
    "PwffDeadLetters": {
        "series": {
            # Counters start at 0 (shared.metrics): increase() sees the first dead letter.
            'pwff_messages_dead_lettered_total{namespace="sick",queue="pwff.tasks"}': "0 0 0 1x37",
            'pwff_messages_dead_lettered_total{namespace="sick",queue="pwff.events"}': "0x40",
            'pwff_messages_dead_lettered_total{namespace="well",queue="pwff.tasks"}': "0x40",
        },
        "quiet_at": "30m",  # the dead letter is older than the 10 m window
        "fires_at": "5m",
        "firing": [{"namespace": "sick", "queue": "pwff.tasks"}],
    },
    "PwffUnauthenticatedMessages": {
        "series": {
            # Counters start at 0 for every reason (shared.metrics).
            'pwff_messages_rejected_total{namespace="sick",reason="bad_tag"}': "0 0 0 1x37",
            'pwff_messages_rejected_total{namespace="sick",reason="missing_tag"}': "0x40",
            # A task over its budget is refused too, but it is no authentication failure.
            'pwff_messages_rejected_total{namespace="well",reason="task_budget"}': "0 0 0 1x37",
            'pwff_messages_rejected_total{namespace="well",reason="bad_tag"}': "0x40",
        },
        "quiet_at": "30m",
        "fires_at": "5m",
        "firing": [{"namespace": "sick", "reason": "bad_tag"}],
    },
    "PwffRoundsPastDeadline": {
        "series": {
            'pwff_rounds_closed_at_deadline_total{namespace="sick"}': "0 0 1x38",
            'pwff_rounds_closed_at_deadline_total{namespace="well"}': "0x40",
        },
        "quiet_at": "1m",
        "fires_at": "10m",
        "firing": [{"namespace": "sick"}],
    },
    "PwffJobsFailing": {
        "series": {
            'pwff_jobs_finished_total{namespace="sick",state="failed"}': "0 0 0 1x37",
            'pwff_jobs_finished_total{namespace="sick",state="succeeded"}': "0+1x40",
            'pwff_jobs_finished_total{namespace="well",state="failed"}': "0x40",
            'pwff_jobs_finished_total{namespace="well",state="succeeded"}': "0+1x40",
        },
        "quiet_at": "2m",
        "fires_at": "5m",
        "firing": [{"namespace": "sick"}],
    },
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run scripts/ensure-system-packages.sh (Debian's prometheus package)")
    return path


def _rules(path: Path = RULES) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _render_annotation(text: str, labels: dict[str, str]) -> str:
    # The annotations use only {{ $labels.NAME }}: rendered here as Prometheus would.
    out = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), text)
    assert "{{" not in out, out
    return out


def _unit_tests(rules_file: Path) -> dict[str, Any]:
    by_name = {rule["alert"]: rule for rule in _rules(rules_file)}
    tests = []
    for name, case in SCENARIOS.items():
        rule = by_name[name]
        firing = [
            {
                "exp_labels": {**rule["labels"], **labels},
                "exp_annotations": {k: _render_annotation(v, labels) for k, v in rule["annotations"].items()},
            }
            for labels in case["firing"]
        ]
        tests.append(
            {
                "name": name,
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in case["series"].items()],
                "alert_rule_test": [
                    {"eval_time": case["quiet_at"], "alertname": name, "exp_alerts": []},
                    {"eval_time": case["fires_at"], "alertname": name, "exp_alerts": firing},
                ],
            }
        )
    return {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, check=False)


def test_rules_pass_promtool_check(promtool: str) -> None:
    proc = _promtool(promtool, "check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout
    assert len(_rules()) == 5


def test_every_alert_has_a_unit_test() -> None:
    assert {rule["alert"] for rule in _rules()} == set(SCENARIOS)
    for rule in _rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_each_alert_fires_on_its_failure_and_only_there(promtool: str, tmp_path: Path) -> None:
    suite = tmp_path / "alerts.test.yaml"
    suite.write_text(yaml.safe_dump(_unit_tests(RULES), sort_keys=False))
    proc = _promtool(promtool, "test", "rules", str(suite))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_a_unit_test_catches_a_wrong_rule(promtool: str, tmp_path: Path) -> None:
    """The suite can fail: with the dead-letter alert's queue grouping dropped, its expected labels are wrong."""
    broken = yaml.safe_load(RULES.read_text())
    for rule in broken["groups"][0]["rules"]:
        if rule["alert"] == "PwffDeadLetters":
            rule["expr"] = rule["expr"].replace("by (namespace, queue)", "by (namespace)")
    rules = tmp_path / "broken.yaml"
    rules.write_text(yaml.safe_dump(broken))
    suite = tmp_path / "broken.test.yaml"
    suite.write_text(yaml.safe_dump(_unit_tests(rules), sort_keys=False))
    proc = _promtool(promtool, "test", "rules", str(suite))
    assert proc.returncode != 0 and "PwffDeadLetters" in proc.stdout + proc.stderr


def test_chart_ships_the_rules_as_an_optional_prometheus_rule(
    render: Render,  # noqa: F811 (the fixture)
    crd_validator: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],  # noqa: F811 (the fixture)
    promtool: str,
    tmp_path: Path,
) -> None:
    assert not [m for m in render() if m["kind"] == "PrometheusRule"]
    manifests = render(
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.labels.release=kube-prometheus-stack",
    )
    (rule,) = [m for m in manifests if m["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == f"{RELEASE}-alerts"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The rendered spec is the rules file, untouched by Helm's templating ({{ $labels.x }} survives).
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    # The prometheus-operator's CRD schema accepts it (tests/crd_validate.mjs, as for the ServiceMonitor).
    (verdict,) = crd_validator([rule])
    assert verdict["ok"], verdict
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    proc = _promtool(promtool, "check", "rules", str(rendered))
    assert proc.returncode == 0, proc.stdout + proc.stderr

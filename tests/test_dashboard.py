"""The Grafana dashboard (deploy/helm/pwff/files/dashboard.json) passes a structural check: a JSON Schema of
the dashboard model (tests/schemas/grafana-dashboard.schema.json) plus what a schema cannot say (unique ids,
panels inside the 24-column grid without overlaps, only defined variables), and every PromQL expression
parses (`promtool check rules` on them as recording rules). tests/integration/test_live_scrape.py runs the
same expressions against a live Prometheus.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared.metrics import PER_JOB

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "helm" / "pwff" / "files" / "dashboard.json"
SCHEMA = Path(__file__).parent / "schemas" / "grafana-dashboard.schema.json"
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}


def _board() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    top: list[dict[str, Any]] = board["panels"]
    return top + [sub for panel in top if panel["type"] == "row" for sub in panel.get("panels", [])]


def structural_errors(board: dict[str, Any]) -> list[str]:
    """Everything wrong with `board`: schema violations first, then the cross-panel rules."""
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(board)]
    if errors:
        return errors
    panels = _panels(board)
    ids = [panel["id"] for panel in panels]
    errors += [f"panel id {i} used {ids.count(i)} times" for i in sorted(set(ids)) if ids.count(i) > 1]
    occupied: dict[tuple[int, int], int] = {}
    for panel in board["panels"]:  # rows' own panels are laid out when the row opens
        grid = panel["gridPos"]
        if grid["x"] + grid["w"] > 24:
            errors.append(f"panel {panel['id']} ends at column {grid['x'] + grid['w']} of 24")
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        errors += [
            f"panel {panel['id']} overlaps panel {other}"
            for other in sorted({occupied[c] for c in cells & occupied.keys()})
        ]
        occupied.update(dict.fromkeys(cells, panel["id"]))
    defined = {variable["name"] for variable in board["templating"]["list"]}
    for panel in panels:
        if panel["type"] == "row":
            continue
        refs = [t["refId"] for t in panel["targets"]]
        if len(refs) != len(set(refs)):
            errors.append(f"panel {panel['id']}: refIds {refs} repeat")
        for target in panel["targets"]:
            for name in re.findall(r"\$\{?([A-Za-z_]\w*)\}?", target["expr"]):
                if name not in defined | GRAFANA_VARIABLES:
                    errors.append(f"panel {panel['id']} {target['refId']}: undefined variable ${name}")
    return errors


def test_dashboard_passes_the_structural_check() -> None:
    assert structural_errors(_board()) == []


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda b: b["panels"][1]["targets"][0].pop("expr"), "'expr' is a required property"),
        (lambda b: b["panels"][1].update(id=b["panels"][0]["id"]), "used 2 times"),
        (lambda b: b["panels"][0]["gridPos"].update(w=12), "overlaps panel"),
        (lambda b: b["panels"][0]["datasource"].update(uid="prom-1"), "'${datasource}' was expected"),
        (lambda b: b["panels"][0].pop("gridPos"), "'gridPos' is a required property"),
        (lambda b: b["panels"][0]["targets"][0].update(expr="sum(x{namespace=~'$ns'})"), "undefined variable $ns"),
    ],
)
def test_the_structural_check_catches_a_broken_dashboard(breakage: Any, message: str) -> None:
    board = copy.deepcopy(_board())
    breakage(board)
    errors = structural_errors(board)
    assert any(message in error for error in errors), errors


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run scripts/ensure-system-packages.sh (Debian's prometheus package)")
    fill = {"namespace": ".*", "__rate_interval": "2m", "__interval": "30s", "__range": "6h"}
    rules = []
    for panel in _panels(_board()):
        for target in panel.get("targets", []):
            expr = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: fill[m.group(1)], target["expr"])
            rules.append({"record": f"pwff_dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard-expressions.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_per_job_panels_group_by_the_job_id_label() -> None:
    """Grouping by `job` would group by the scrape job: pwff's own label is `job_id`."""
    per_job = [metric._name for metric in PER_JOB]
    seen: set[str] = set()
    for panel in _panels(_board()):
        for target in panel.get("targets", []):
            used = [name for name in per_job if name in target["expr"]]
            if used:
                seen.update(used)
                assert re.search(r"\bby \(job_id\b", target["expr"]), (panel["title"], target["expr"])
                assert "{{job_id}}" in target["legendFormat"], panel["title"]
            assert "exported_job" not in target["expr"] and not re.search(r"by \(job\)", target["expr"])
    assert seen == set(per_job), set(per_job) - seen

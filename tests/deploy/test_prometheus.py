"""deploy/prometheus: promtool's checks and rule unit tests, every alert tested both ways, and
only metric names that really exist (the gateway's registry, the session Triton's scrape)."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from gateway.metrics import Metrics, QueueReading
from tests.deploy.tools import require

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
# Every metric of ours starts with one of these (`worker_`: the job workers'); `up` is
# Prometheus's own.
OUR_METRIC = re.compile(r"\b(?:gateway|nv|imagegen|worker)_[a-z0-9_]+\b")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def test_promtool_accepts_the_config_and_the_rules() -> None:
    assert RULES and RULE_TESTS
    checked = promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in checked.stdout
    checked = promtool("check", "rules", *RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_rule_unit_tests_pass() -> None:
    tested = promtool("test", "rules", *RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_stays_silent() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names, "no alerts found"
    assert names - fires == set(), "alerts never seen firing"
    assert names - silent == set(), "alerts never seen silent"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("runbook"), rule["alert"]


def test_every_recording_rule_has_a_test_of_its_values() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    assert "imagegen:triton_diffusion_queue_compute_ratio:rate1m" in recorded
    tested = {
        check["expr"]
        for path in RULE_TESTS
        for case in yaml.safe_load(path.read_text())["tests"]
        for check in case.get("promql_expr_test", [])
        if check.get("exp_samples")
    }
    assert recorded - tested == set(), "recording rules no promtool test computes"


def _names(text: str) -> set[str]:
    """Series names as exposed, and declared families that have no series yet. (prometheus_client's
    parser would rename Triton's counters to `..._total`, which is not what Prometheus stores.)"""
    names = set()
    for line in text.splitlines():
        declared = re.match(r"# TYPE (\S+) ", line)
        exposed = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", line)
        if declared or exposed:
            names.add((declared or exposed).group(1))  # type: ignore[union-attr]
    return names


def test_rules_and_their_tests_use_only_metrics_that_exist(triton: Any) -> None:
    # The gateway's and the job worker's registry, with the queue's gauges a gateway adds when
    # its store answers a scrape.
    exported = _names(Metrics().render(QueueReading(queued=0, oldest_age_s=0.0)).decode())
    with urllib.request.urlopen(triton.metrics_url, timeout=10) as resp:
        exported |= _names(resp.read().decode())
    used = set()
    for rule in rules():
        used |= set(OUR_METRIC.findall(rule["expr"]))
    assert {"gateway_uploads_total", "nv_inference_queue_duration_us", "imagegen_model_info",
            "nv_inference_compute_infer_duration_us", "gateway_jobs_queued",
            "gateway_jobs_oldest_queued_age_seconds", "gateway_store_errors_total",
            "worker_webhook_deliveries_total", "worker_jobs_running"} <= used
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for series in case.get("input_series", []):
                used |= set(OUR_METRIC.findall(series["series"].split("{", 1)[0]))
    assert used - exported == set(), "metric names that neither the gateway nor Triton exports"

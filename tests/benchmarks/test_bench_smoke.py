"""Smoke run of `make bench` itself (`python -m bench --smoke`): the kernel
path's blasts and entries, the accounting backends, and the report. The
issue-8 modules have their own smoke tests beside this one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, conntrack)")
def test_bench_smoke_writes_its_report(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--only", "kernel,accounting",
                             "--output", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads((tmp_path / "results.json").read_text())
    for key in ("kernel_pps_ratio_1", "entries_installed_per_s", "relay_cpu_percent_kernel_blast",
                "accounting_records_per_s_database_sqlite"):
        assert isinstance(numbers.get(key), (int, float)) and numbers[key] >= 0, (key, numbers.get(key))
    report = (tmp_path / "RESULTS.md").read_text()
    assert "**Smoke run**" in report and "`entries_installed_per_s`" in report

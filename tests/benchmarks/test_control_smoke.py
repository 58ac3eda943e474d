"""Smoke run of the control-plane benchmark (bench/control.py): both servers
(media-dispatcher + media-relay, and rtpengine) answer, every figure comes out."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.skipif(not shutil.which("rtpengine") and not os.path.exists("/usr/bin/rtpengine"),
                    reason="rtpengine (the reference) is not installed")
def test_control_smoke():
    from bench.control import KEYS

    result = subprocess.run([sys.executable, "-m", "bench.control", "--smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)
    for key in KEYS:
        value = answer["figures"].get(key)
        assert isinstance(value, (int, float)) and value > 0, (key, value, result.stderr[-2000:])
    assert answer["rows"] and all(set(row) == {"figure", "value", "reference", "ratio", "target", "status"}
                                  for row in answer["rows"])

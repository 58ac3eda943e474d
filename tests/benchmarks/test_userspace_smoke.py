"""Smoke run of the user-space forwarding benchmark (bench/userspace.py): the
relay in user space against a minimal Twisted forwarder, a few seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_userspace_benchmark_smoke():
    from bench.userspace import KEYS

    result = subprocess.run([sys.executable, "-m", "bench.userspace", "--smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=110, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)
    for key in KEYS:
        value = answer["figures"].get(key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, (key, value)
    assert answer["rows"] and all({"figure", "value", "reference", "ratio", "target", "status"} <= set(row)
                                  for row in answer["rows"])
    assert isinstance(answer["notes"], list)
    json.dumps(answer["details"])

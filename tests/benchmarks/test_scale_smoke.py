"""Smoke run of the scale benchmark (bench/scale.py): one relay and one dispatcher in
namespaces, a few hundred calls in waves into the kernel, the expiry burst and the
dispatcher restart at small counts (about 20-30 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, conntrack, AF_PACKET)")
def test_scale_benchmark_smoke():
    from bench.scale import KEYS

    result = subprocess.run([sys.executable, "-m", "bench.scale", "--smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=175, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)
    for key in KEYS:
        value = answer["figures"].get(key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value, answer["notes"])
    assert [row["figure"] for row in answer["rows"]] == list(KEYS)
    assert all({"figure", "value", "reference", "ratio", "target", "status"} <= set(row) for row in answer["rows"])
    assert isinstance(answer["notes"], list)
    json.dumps(answer["details"])

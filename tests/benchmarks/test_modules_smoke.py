"""Smoke runs of issue 8's benchmark modules (`python -m bench.NAME --smoke`):
each runs end to end at small counts and gives every figure it promises,
with the rows of its RESULTS.md section. No figure is judged."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(220)]

MODULES = [
    # name, seconds allowed, whether every figure must be above 0
    pytest.param("control", 110, True, id="control",          # the daemons against rtpengine
                 marks=pytest.mark.skipif(not shutil.which("rtpengine"), reason="rtpengine is not installed")),
    pytest.param("userspace", 110, True, id="userspace"),      # the relay against a minimal Twisted forwarder
    pytest.param("scale", 190, False, id="scale"),             # calls in waves, expiry burst, restart
]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, conntrack, AF_PACKET)")
@pytest.mark.parametrize("name, seconds, positive", MODULES)
def test_benchmark_module_smoke(name, seconds, positive):
    keys = __import__(f"bench.{name}", fromlist=["KEYS"]).KEYS
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=seconds, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)
    for key in keys:
        value = answer["figures"].get(key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value, answer["notes"])
        assert value > 0 or not positive, (key, value)
    assert answer["rows"] and all({"figure", "value", "reference", "ratio", "target", "status"} <= set(row)
                                  for row in answer["rows"])
    assert isinstance(answer["notes"], list)
    json.dumps(answer["details"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, conntrack, AF_PACKET)")
def test_soak_smoke(tmp_path):
    """`make soak` in 20 seconds: every figure given, no leak, no error line, every ended call
    accounted; its section written into RESULTS.md and results.json next to what is there."""
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\nfrom make bench\n")
    (tmp_path / "results.json").write_text('{"control_rate_1": 1.0}\n')
    result = subprocess.run([sys.executable, "-m", "bench.soak", "--smoke", "--output", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    from bench.soak import KEYS
    assert all(isinstance(figures[key], (int, float)) for key in KEYS), figures
    assert figures["soak_calls_ended"] > figures["soak_calls"]          # calls were churned
    assert figures["soak_leaked"] == figures["soak_error_lines"] == figures["soak_accounting_missing"] == 0
    results = (tmp_path / "RESULTS.md").read_text()
    assert "from make bench" in results and "## Soak" in results
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["control_rate_1"] == 1.0 and data["soak_leaked"] == 0

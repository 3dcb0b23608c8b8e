"""The fault-injection harness users run (scripts/crash_test.py), in a small version."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "crash_test.py"


def harness(tmp_path: Path, kills: int, seed: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--kills",
            str(kills),
            "--seed",
            str(seed),
            "--corrupt-prob",
            "0.5",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )


def test_harness_small(tmp_path: Path) -> None:
    result = harness(tmp_path, kills=3, seed=11)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kills injected: 3" in result.stdout
    assert "kills verified: 3 of 3" in result.stdout
    assert "RESULT: PASS" in result.stdout


@pytest.mark.slow
def test_harness_many_kills(tmp_path: Path) -> None:
    result = harness(tmp_path, kills=15, seed=5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kills injected: 15" in result.stdout
    assert "kills verified: 15 of 15" in result.stdout
    # How many second processes met a lock depends on timing (the lock itself is tested in
    # test_resume.py); the harness must have checked and reported it.
    assert re.search(r"second processes refused: \d+", result.stdout)
    assert "RESULT: PASS" in result.stdout

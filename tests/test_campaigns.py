"""The fault campaigns of scripts/crash_test.py, each on a real training run: power cuts,
a failing disk, and readers during writes. Marked `powercut` (minutes, not seconds): run
them with `pytest -m powercut`. Power cuts and disk faults need faultfs (fuse3 and mfusepy):
without them these tests fail loudly, they do not skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "scripts" / "crash_test.py"
FSYNC_MUTATIONS = "fsync-dir,file-fsync,commit-file-fsync,manifest-fsync,tmp-dir-fsync"

pytestmark = pytest.mark.powercut


def harness(tmp_path: Path, *args: str, timeout: float = 1500) -> str:
    result = subprocess.run(
        [sys.executable, str(HARNESS), *args, "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result.stdout


def test_power_cut_campaign(tmp_path: Path) -> None:
    """Kill and cut the power of a real training run, over and over, in every stage."""
    out = harness(tmp_path, "--power-cut", "--cuts", "25", "--seed", "7")
    assert "cuts: 25 (by stage:" in out
    assert "cuts verified: 25 of 25" in out
    assert "committed steps lost: 0; committed directories lost: 0" in out
    assert "RESULT: PASS" in out


def test_power_cut_campaign_catches_each_removed_fsync(tmp_path: Path) -> None:
    """The campaign can fail: with any one fsync of durable.py removed it finds a lost or
    damaged commit (scripts/mutation_check.py's edits, on copies of the checkout)."""
    out = harness(
        tmp_path, "--power-cut", "--cuts", "10", "--seed", "3", "--mutations", FSYNC_MUTATIONS
    )
    assert out.count("| cut ") == 5, out
    assert "NOT CAUGHT" not in out
    assert "RESULT: PASS (5 mutations" in out


def test_failing_disk_campaign(tmp_path: Path) -> None:
    """EIO and ENOSPC at random calls of every stage, TensorFlow's own writes included: each
    ends in one error line naming the path; the rerun ends bit-identical."""
    out = harness(tmp_path, "--disk-faults", "--faults", "40", "--seed", "11")
    assert "errors injected: 40 (by stage:" in out
    assert "committed files failing verification after an error: 0" in out
    assert "RESULT: PASS" in out


def test_readers_during_writes(tmp_path: Path) -> None:
    """status, status --json, report, predict and TensorBoard read a run while it trains,
    checkpoints, evaluates and exports: no crash, no half-written state."""
    out = harness(tmp_path, "--readers", "--reads", "200", "--seed", "5")
    assert "crashes or tracebacks: 0" in out
    assert "RESULT: PASS" in out

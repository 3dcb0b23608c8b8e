"""Multiruns through Hydra launchers: every combination in its own run directory, a failed job
does not stop the others, and rerunning the same multirun after a kill resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, cli

from pipeline.status import by_monitored_metric


def start_group(args: list[str], cwd: Path) -> subprocess.Popen:
    """The CLI in its own process group, so a kill takes the launcher's workers with it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_after_first_checkpoint(
    proc: subprocess.Popen, outputs: Path, timeout: float = 240
) -> None:
    deadline = time.monotonic() + timeout
    while not list(outputs.glob("*/checkpoints/step-*")):
        assert proc.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def runs(cwd: Path) -> dict[str, dict]:
    rows = json.loads(cli(["status", "--json"], cwd).stdout)
    return {row["name"]: row for row in rows}


def logs(outputs: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in outputs.glob("*/pipeline.log")}


def test_status_lists_the_best_run_first() -> None:
    rows = [
        {"name": "b", "best_val_accuracy": 0.5},
        {"name": "c", "best_val_accuracy": None},
        {"name": "a", "best_val_accuracy": 0.9},
        {"name": "d", "best_val_accuracy": 0.5},
    ]
    assert [r["name"] for r in by_monitored_metric(rows)] == ["a", "b", "d", "c"]


def test_a_failed_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    # The first job diverges (exit code 1 on its own); the second still runs to the end.
    result = cli(
        ["train", "-m", "model=mlp", "optimizer.learning_rate=1e30,1e-3", *TINY, "fit.epochs=1"],
        tmp_path,
    )
    assert result.returncode == 1
    assert "The training loss became NaN or infinite" in result.stderr
    states = sorted(row["state"] for row in runs(tmp_path).values())
    assert states == ["done", "failed"], states


@pytest.mark.slow
def test_joblib_2x2_sweep_resumes_after_a_kill_and_skips_finished_runs(tmp_path: Path) -> None:
    sweep = [
        "train",
        "-m",
        "model=mlp,cnn",
        "seed=1,2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY,
    ]
    kill_after_first_checkpoint(start_group(sweep, tmp_path), tmp_path / "outputs")
    result = cli(sweep, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    found = runs(tmp_path)
    assert sorted(found) == sorted(
        f"data.test_size=100,data.train_size=300,data.val_fraction=0.2,data=sample,"
        f"fit.batch_size=50,model={m},seed={s}"
        for m in ("mlp", "cnn")
        for s in (1, 2)
    )
    assert all(row["state"] == "done" and row["step"] == 10 for row in found.values())
    assert any("Fit: resuming from step-" in text for text in logs(tmp_path / "outputs").values())
    # The same command once more: every run is finished, so every job only skips.
    before = {name: row["latest_checkpoint"] for name, row in found.items()}
    result = cli(sweep, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    for name, text in logs(tmp_path / "outputs").items():
        assert text.count("fit: done (2 epochs, step 10); skipped") == 1, name
    assert {n: r["latest_checkpoint"] for n, r in runs(tmp_path).items()} == before


@pytest.mark.slow
def test_submitit_local_sweep_resumes_after_a_kill(tmp_path: Path) -> None:
    # TINY's 10 mlp steps end a few tenths of a second after the first checkpoint (step 2) on a
    # quick machine, close to the kill's own latency; 40 epochs (a few seconds) keep fit running.
    sweep = [
        "train",
        "-m",
        "model=mlp",
        "seed=1,2",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        *TINY,
        "fit.epochs=40",
    ]
    kill_after_first_checkpoint(start_group(sweep, tmp_path), tmp_path / "outputs")
    result = cli(sweep, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    found = runs(tmp_path)
    assert len(found) == 2
    assert all(row["state"] == "done" and row["step"] == 200 for row in found.values())
    assert any("Fit: resuming from step-" in text for text in logs(tmp_path / "outputs").values())


@pytest.mark.slow
def test_submitit_signal_saves_a_checkpoint_and_requeues(tmp_path: Path) -> None:
    # What Slurm does before the time limit (submitit's signal, USR2 unless
    # SUBMITIT_PREEMPT_SIGNAL says otherwise): the job saves a checkpoint, is requeued, resumes.
    # 100 epochs of 5 mlp steps (a few seconds): with 3, fit ended ~0.08 s after the first
    # checkpoint on a quick machine, so the signal landed between fit and evaluate (handled:
    # "Interrupted before the evaluate stage", requeued) instead of inside fit, which this tests.
    sweep = [
        "train",
        "-m",
        "model=mlp",
        "seed=3",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        *TINY,
        "fit.epochs=100",
        "checkpoint.every_steps=0",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *sweep],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    outputs = tmp_path / "outputs"
    deadline = time.monotonic() + 240
    while not list(outputs.glob("*/checkpoints/step-*")):  # end of epoch 1: fit is running
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    lock = next(outputs.glob("*/.lock"))
    os.kill(json.loads(lock.read_text())["pid"], signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    (row,) = runs(tmp_path).values()
    assert row["state"] == "done" and row["step"] == 500
    text = (tmp_path / row["dir"] / "pipeline.log").read_text()
    assert "Interrupted: checkpoint saved at step" in text
    assert "Fit: resuming from step-" in text

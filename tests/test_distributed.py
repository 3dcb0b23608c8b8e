"""strategy=multi_worker: two local workers (scripts/launch_workers.py) train a small slice,
survive a worker kill, and resume bit-identical to an uninterrupted two-worker run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SMALL, assert_same_state, final_state, only_run_dir

from pipeline.distribute import Worker, cluster_source, shard_sizes, worker_from_tf_config
from pipeline.errors import ConfigError

LAUNCH = ROOT / "scripts" / "launch_workers.py"
ARGS = ["train", *SMALL, "export.h5=false"]


def launch(cwd: Path, workers: int = 2) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, str(LAUNCH), "-n", str(workers), "--", *ARGS],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def worker_pids(proc: subprocess.Popen, n: int = 2) -> list[int]:
    assert proc.stdout is not None
    pids = []
    while len(pids) < n:
        line = proc.stdout.readline()
        if line.startswith("worker "):
            pids.append(int(line.split()[3]))
    return pids


def epoch_lines(log_text: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in log_text.splitlines() if "] Epoch " in line]


def test_tf_config_gives_the_worker_and_the_chief() -> None:
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}
    text = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 2}})
    assert worker_from_tf_config(text) == Worker(2, 3)
    with_chief = {"chief": ["h:1"], "worker": ["h:2"]}
    text = json.dumps({"cluster": with_chief, "task": {"type": "chief", "index": 0}})
    assert worker_from_tf_config(text).is_chief
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        worker_from_tf_config("{not json")


def test_cluster_must_be_described(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    with pytest.raises(ConfigError, match="needs a cluster"):
        cluster_source("auto")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert cluster_source("auto") == "slurm"


def test_global_batch_is_split_over_replicas() -> None:
    assert shard_sizes(50, 2) == [25, 25]
    assert shard_sizes(30, 4) == [8, 8, 7, 7]


@pytest.mark.slow
def test_two_workers_survive_a_worker_kill_and_resume_bit_identical(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    code, out, err = finish(launch(reference))
    assert code == 0, err
    ref_dir = only_run_dir(reference / "outputs")
    assert json.loads((ref_dir / "metrics.json").read_text())["checkpoint_step"] == 30
    assert "Global batch 50 = 2 replicas x 25 per replica" in out
    # Every worker holds the same model (BatchNorm statistics included): same validation lines.
    worker_log = (ref_dir / "pipeline.worker1.log").read_text()
    assert "worker 1 of 2" in worker_log
    assert epoch_lines(worker_log) == epoch_lines((ref_dir / "pipeline.log").read_text())
    assert len(epoch_lines(worker_log)) == 3

    killed = tmp_path / "killed"
    killed.mkdir()
    proc = launch(killed)
    chief, worker = worker_pids(proc)
    deadline = time.monotonic() + 300
    while len(list((killed / "outputs").glob("*/checkpoints/step-*"))) < 2:  # mid epoch 1+
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    code, _, err = finish(proc)
    assert code != 0 and "worker 1 exited with -9" in err
    code, out, err = finish(launch(killed))  # restart the job
    assert code == 0, err
    assert "Fit: resuming from step-" in out
    run_dir = only_run_dir(killed / "outputs")
    assert_same_state(final_state(ref_dir), final_state(run_dir))
    ours = json.loads((run_dir / "metrics.json").read_text())
    assert ours["test_loss"] == json.loads((ref_dir / "metrics.json").read_text())["test_loss"]

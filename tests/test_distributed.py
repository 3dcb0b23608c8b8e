"""strategy=multi_worker: two local workers (scripts/launch_workers.py) train a small slice
holding the same state bit for bit, stop together on a signal to one of them, refuse to start
from different checkpoints, survive a worker kill, and resume bit-identical to an uninterrupted
two-worker run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SMALL, assert_same_state, final_state, only_run_dir

from pipeline import checkpoint, durable
from pipeline.distribute import Worker, cluster_source, shard_sizes, worker_from_tf_config
from pipeline.errors import ConfigError

LAUNCH = ROOT / "scripts" / "launch_workers.py"
ARGS = ["train", *SMALL, "export.h5=false"]


def load_launcher():
    spec = importlib.util.spec_from_file_location("launch_workers", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launcher = load_launcher()


def launch(cwd: Path, workers: int = 2) -> subprocess.Popen:
    """The job through scripts/launch_workers.py itself (scratch directories under cwd/tmp)."""
    (cwd / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(cwd / "tmp")}
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


# Loaded by Python at start-up (PYTHONPATH) in every worker of a `Job`.
HOOKS = """
import json
import os
import shutil
from pathlib import Path

# TEST_KEEP_SCRATCH: copy what a worker's scratch directory holds at the moment it is deleted.
KEEP = os.environ.get("TEST_KEEP_SCRATCH")
if KEEP:
    rmtree = shutil.rmtree

    def keeping_rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("pipeline-worker") and path.is_dir():
            shutil.copytree(path, Path(KEEP) / path.name, symlinks=True)
        return rmtree(path, *args, **kwargs)

    shutil.rmtree = keeping_rmtree

# TEST_STALE_VIEW: worker 1 sees the shared run directory one checkpoint behind the chief, as
# on a filesystem that is not shared or not yet in sync.
if os.environ.get("TEST_STALE_VIEW") and json.loads(os.environ["TF_CONFIG"])["task"]["index"]:
    from pipeline import checkpoint

    load_latest = checkpoint.load_latest

    def stale_load_latest(root, only_step=None, owner=True):
        return load_latest(root, checkpoint.committed_steps(root)[-2], owner)

    checkpoint.load_latest = stale_load_latest
"""


class Job:
    """A two-worker job started here with launch_workers.py's TF_CONFIG and command lines, but
    with each worker's exit code and output files of its own. Scratch directories go to
    cwd/tmp; what each held when it was deleted is copied to cwd/scratch-copies."""

    def __init__(self, cwd: Path, name: str, **env: str) -> None:
        self.cwd, self.name = cwd, name
        self.tmp, self.copies, hooks = cwd / "tmp", cwd / "scratch-copies", cwd / "hooks"
        for directory in (self.tmp, self.copies, hooks):
            directory.mkdir(exist_ok=True)
        (hooks / "sitecustomize.py").write_text(HOOKS)
        python_path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
        ports = launcher.free_ports(2)
        self.procs: list[subprocess.Popen] = []
        for i in range(2):
            worker_env = {
                **os.environ,
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "TF_CONFIG": launcher.tf_config(ports, i),
                "TMPDIR": str(self.tmp),
                "PYTHONPATH": python_path,
                "TEST_KEEP_SCRATCH": str(self.copies),
                **env,
            }
            with open(self.output(i, "out"), "w") as out, open(self.output(i, "err"), "w") as err:
                self.procs.append(
                    subprocess.Popen(
                        launcher.worker_args(ARGS, i),
                        cwd=cwd,
                        env=worker_env,
                        stdout=out,
                        stderr=err,
                    )
                )

    def output(self, worker: int, kind: str) -> Path:
        return self.cwd / f"{self.name}.worker{worker}.{kind}"

    def stderr(self, worker: int) -> str:
        return self.output(worker, "err").read_text()

    def wait(self, timeout: float = 600) -> list[int]:
        """Every worker's exit code; kills the job if it does not end in time."""
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            self.kill()
        return [proc.returncode for proc in self.procs]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def errors(self) -> str:
        """Both workers' exit codes and stderr without TensorFlow's start-up chatter."""
        chatter = re.compile(r"^([IWE]\d{4} |WARNING: All log messages before absl)")
        parts = []
        for i, proc in enumerate(self.procs):
            lines = [line for line in self.stderr(i).splitlines() if not chatter.match(line)]
            parts.append(f"worker {i} exit {proc.returncode}:\n" + "\n".join(lines[-30:]))
        return "\n".join(parts)

    @property
    def run_dir(self) -> Path:
        return only_run_dir(self.cwd / "outputs")

    def scratch(self) -> Path:
        """Worker 1's scratch directory, as its log names it."""
        log_text = (self.run_dir / "pipeline.worker1.log").read_text()
        return Path(re.findall(r"worker 1 of 2, scratch (\S+), ", log_text)[-1])


def committed(directory: Path) -> list[int]:
    return checkpoint.committed_steps(directory / "checkpoints")


def state_at(directory: Path, step: int) -> dict[str, np.ndarray]:
    """The arrays of checkpoint `step` under `directory`, verified against its manifest."""
    return checkpoint.load(checkpoint.path_for(directory / "checkpoints", step)).arrays


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """One uninterrupted two-worker run of ARGS."""
    job = Job(tmp_path_factory.mktemp("pair_reference"), "reference")
    codes = job.wait()
    assert codes == [0, 0], job.errors()
    return job


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
def test_workers_hold_the_same_state_bit_for_bit_and_remove_their_scratch(reference: Job) -> None:
    run_dir = reference.run_dir
    assert json.loads((run_dir / "metrics.json").read_text())["checkpoint_step"] == 30
    assert "Global batch 50 = 2 replicas x 25 per replica" in reference.output(0, "out").read_text()
    # Worker 1 trained in a scratch directory; it is gone after a normal finish.
    scratch = reference.scratch()
    assert scratch.parent == reference.tmp
    assert not scratch.exists() and not list(reference.tmp.glob("pipeline-worker*"))
    # What it held when it was deleted: the same checkpoints as the chief's, bit for bit
    # (BatchNorm statistics, optimizer state and metric sums included).
    held = reference.copies / scratch.name
    assert committed(held) == committed(run_dir)
    assert committed(run_dir)[-1] == 30
    for step in committed(run_dir):
        assert_same_state(state_at(run_dir, step), state_at(held, step))


STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM]


@pytest.mark.slow
@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_to_one_worker_stops_both_at_the_same_step_and_both_resume_there(
    tmp_path: Path, reference: Job, signum: int
) -> None:
    job = Job(tmp_path, "interrupted")
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "outputs").glob("*/checkpoints/step-*")):  # in epoch 1
            assert all(p.poll() is None for p in job.procs), job.errors()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        job.procs[1].send_signal(signum)  # the non-chief alone is told
        codes = job.wait()
    finally:
        job.kill()
    name = signal.Signals(signum).name
    # The signalled worker exits 128+signal; the chief, stopped because a worker was, 130.
    assert codes == [130, 128 + signum], job.errors()
    assert f"{name}: finishing this step and saving a checkpoint" in job.stderr(1)
    saved = [
        re.findall(r"Interrupted: checkpoint saved at step (\d+) ", job.stderr(i)) for i in (0, 1)
    ]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved
    step = int(saved[0][0])
    run_dir = job.run_dir
    assert committed(run_dir)[-1] == step < 30
    assert durable.read_record(run_dir / "session.json")["state"] == "interrupted"
    # Worker 1 saved that step too, the same bits, and its scratch went when it stopped.
    scratch = job.scratch()
    assert not scratch.exists()
    assert committed(job.copies / scratch.name)[-1] == step
    assert_same_state(state_at(run_dir, step), state_at(job.copies / scratch.name, step))

    rerun = Job(tmp_path, "rerun")
    assert rerun.wait() == [0, 0], rerun.errors()
    # Both restored that step (the interrupted session started fresh: no resume line).
    for log_name in ("pipeline.log", "pipeline.worker1.log"):
        resumed = re.findall(r"Fit: resuming from (step-\d+)", (run_dir / log_name).read_text())
        assert resumed == [f"step-{step:09d}"], (log_name, resumed)
    assert_same_state(final_state(reference.run_dir), final_state(run_dir))
    assert not list(rerun.tmp.glob("pipeline-worker*"))  # no scratch left by either session


@pytest.mark.slow
def test_workers_that_see_different_newest_checkpoints_refuse_to_train(
    tmp_path: Path, reference: Job
) -> None:
    run_dir = tmp_path / "outputs" / reference.run_dir.name
    shutil.copytree(reference.run_dir, run_dir)
    steps = committed(run_dir)
    job = Job(tmp_path, "stale", TEST_STALE_VIEW="1")  # worker 1 sees the checkpoint before
    assert job.wait() == [1, 1], job.errors()
    message = (
        f"error: The workers see different newest checkpoints in {run_dir / 'checkpoints'} "
        f"(steps {steps[-2]} to {steps[-1]})."
    )
    assert message in job.stderr(0) and message in job.stderr(1)
    assert "Traceback" not in job.errors()
    assert committed(run_dir) == steps and not list(run_dir.glob("checkpoints/*.corrupt*"))
    assert durable.read_record(run_dir / "session.json")["state"] == "failed"


@pytest.mark.slow
def test_two_workers_survive_a_worker_kill_and_resume_bit_identical(
    tmp_path: Path, reference: Job
) -> None:
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
    ref_dir = reference.run_dir
    assert_same_state(final_state(ref_dir), final_state(run_dir))
    ours = json.loads((run_dir / "metrics.json").read_text())
    assert ours["test_loss"] == json.loads((ref_dir / "metrics.json").read_text())["test_loss"]


def test_scratch_of_a_killed_worker_is_removed_by_the_next_one(tmp_path: Path) -> None:
    import subprocess as sp

    from pipeline.distribute import remove_stale_scratch

    dead = sp.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"pipeline-worker1-pid{dead.pid}-abc"
    alive = tmp_path / f"pipeline-worker1-pid{os.getpid()}-def"
    other = tmp_path / "pipeline-worker1-xyz"  # not ours to judge: no pid in the name
    for path in (stale, alive, other):
        (path / "checkpoints").mkdir(parents=True)
    assert remove_stale_scratch(tmp_path) == [stale]
    assert not stale.exists() and alive.is_dir() and other.is_dir()

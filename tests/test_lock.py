"""pipeline.rundir: the run lock (with a real process killed by SIGKILL), identity, stages."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import durable, rundir
from pipeline.errors import ConfigError, PipelineError, RunLocked

ROOT = Path(__file__).resolve().parent.parent


def locked_message(run_dir: Path, pid: int, started: str) -> str:
    return (
        f"Run {run_dir} is in use by pid {pid} on {socket.gethostname()} since {started}. "
        "Wait for it to finish, stop it, or use another run.name=..."
    )


# ---------------------------------------------------------------- in this process


def test_acquire_records_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "run1"
    lock = rundir.RunLock(run_dir)
    lock.acquire()
    try:
        holder = json.loads((run_dir / ".lock").read_text())
        assert sorted(holder) == ["host", "pid", "started"]
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert time.strptime(holder["started"], "%Y-%m-%d %H:%M:%S")
        assert rundir.lock_holder(run_dir / ".lock") == holder
    finally:
        lock.release()


def test_second_acquire_raises_run_locked(tmp_path: Path) -> None:
    first = rundir.RunLock(tmp_path)
    first.acquire()
    try:
        started = rundir.lock_holder(tmp_path / ".lock")["started"]
        with pytest.raises(RunLocked) as info:
            rundir.RunLock(tmp_path).acquire()
        assert str(info.value) == locked_message(tmp_path, os.getpid(), started)
        assert info.value.exit_code == 3
        # The failed attempt must not have disturbed the holder's record or lock.
        assert rundir.lock_holder(tmp_path / ".lock")["pid"] == os.getpid()
        assert rundir.is_running(tmp_path)
    finally:
        first.release()


def test_release_frees_the_lock(tmp_path: Path) -> None:
    assert not rundir.is_running(tmp_path)  # no .lock file at all
    with rundir.RunLock(tmp_path) as lock:
        assert lock.fd is not None
        assert rundir.is_running(tmp_path)
    assert lock.fd is None
    assert not rundir.is_running(tmp_path)
    assert (tmp_path / ".lock").read_bytes() == b""
    assert rundir.lock_holder(tmp_path / ".lock") is None
    lock.release()  # releasing twice is harmless
    with rundir.RunLock(tmp_path):  # and it can be taken again
        assert rundir.lock_holder(tmp_path / ".lock")["pid"] == os.getpid()


def test_message_without_holder_record(tmp_path: Path) -> None:
    """A holder that has the flock but has not written its record yet (or wrote junk)."""
    import fcntl

    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"{not json")
        with pytest.raises(RunLocked) as info:
            rundir.RunLock(tmp_path).acquire()
        assert str(info.value) == (
            f"Run {tmp_path} is in use by pid ? on ? since ?. Wait for "
            "it to finish, stop it, or use another run.name=..."
        )
    finally:
        os.close(fd)


# ---------------------------------------------------------------- with another process


HOLDER = """
    import sys, time
    from pathlib import Path
    from pipeline import rundir
    rundir.RunLock(Path({run_dir!r})).acquire()
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_of_killed_process_is_free(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER.format(run_dir=str(run_dir)))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "the child did not take the lock within 30 s"
        assert child.stdout.readline() == "locked\n", child.stderr.read()
        assert rundir.is_running(run_dir)
        holder = rundir.lock_holder(run_dir / ".lock")
        assert holder["pid"] == child.pid
        with pytest.raises(RunLocked) as info:
            rundir.RunLock(run_dir).acquire()
        assert str(info.value) == locked_message(run_dir, child.pid, holder["started"])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    # The killed holder's record is still in the file, but the kernel dropped its flock.
    assert rundir.lock_holder(run_dir / ".lock")["pid"] == child.pid
    assert not rundir.is_running(run_dir)
    with rundir.RunLock(run_dir):
        assert rundir.lock_holder(run_dir / ".lock")["pid"] == os.getpid()
        assert rundir.is_running(run_dir)


# ---------------------------------------------------------------- identity


# Flat dotted keys, as config.identity() makes them.
IDENTITY = {"model.name": "cnn", "optimizer.lr": 0.1, "data.train_size": 600, "data.path": None}


def test_identity_recorded_then_accepted(tmp_path: Path) -> None:
    rundir.check_identity(tmp_path, IDENTITY, {"full": True})
    record = durable.read_record(tmp_path / "run.json")
    assert record["identity"] == IDENTITY and record["config"] == {"full": True}
    assert isinstance(record["created"], float)
    before = (tmp_path / "run.json").read_bytes()
    rundir.check_identity(tmp_path, dict(IDENTITY), {"full": "changed is fine"})
    assert (tmp_path / "run.json").read_bytes() == before


def test_different_identity_refused_naming_keys(tmp_path: Path) -> None:
    rundir.check_identity(tmp_path, IDENTITY, {})
    other = {**IDENTITY, "model.name": "mlp", "data.train_size": 900, "fit.seed": 7}
    with pytest.raises(ConfigError) as info:
        rundir.check_identity(tmp_path, other, {})
    assert str(info.value) == (
        f"Run {tmp_path} was made with a different config (data.train_size: 600 -> 900; "
        "fit.seed: '<unset>' -> 7; model.name: 'cnn' -> 'mlp'). Use run.name=<new name> for a "
        "new run, or run.restart=true to discard this one and start over."
    )
    assert info.value.exit_code == 2


def test_removed_identity_key_is_named(tmp_path: Path) -> None:
    rundir.check_identity(tmp_path, IDENTITY, {})
    smaller = {k: v for k, v in IDENTITY.items() if k != "optimizer.lr"}
    with pytest.raises(ConfigError, match=r"config \(optimizer\.lr: 0\.1 -> '<unset>'\)\. Use "):
        rundir.check_identity(tmp_path, smaller, {})


@pytest.mark.parametrize("damage", ["garbage", "flipped", "no identity"])
def test_damaged_run_json(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "run.json"
    rundir.check_identity(tmp_path, IDENTITY, {})
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 not json")
    elif damage == "flipped":
        path.write_bytes(path.read_bytes().replace(b'"cnn"', b'"cmn"', 1))
    else:
        durable.write_record(path, {"config": {}})
    with pytest.raises(PipelineError) as info:
        rundir.check_identity(tmp_path, IDENTITY, {})
    message = str(info.value)
    assert type(info.value) is PipelineError
    assert message.startswith(f"{path} is damaged (")
    if damage == "garbage":  # not recognisably ours: restart would refuse it, so not offered
        assert message.endswith(
            f"Restore it, or delete {tmp_path} to start over (run.restart=true deletes only "
            "runs it knows)"
        )
    else:
        assert message.endswith(
            "), so this run's config cannot be checked. Restore it, or start over with "
            "run.restart=true"
        )
    if damage == "flipped":
        assert "checksum mismatch" in message


# ---------------------------------------------------------------- stage records and restart


def test_stage_records(tmp_path: Path) -> None:
    run = rundir.RunDir(tmp_path)
    assert run.read_stage("fit") is None
    rundir.finish_stage(run, "fit", {"step": 30})
    record = run.read_stage("fit")
    assert record is not None
    assert record["step"] == 30 and isinstance(record["finished"], float)
    rundir.clear_stage(run, "fit")
    assert run.read_stage("fit", owner=True) is None
    rundir.clear_stage(tmp_path, "fit")  # clearing a missing record is fine


def test_damaged_stage_record_is_set_aside_by_the_owner_only(tmp_path: Path) -> None:
    run = rundir.RunDir(tmp_path)
    rundir.finish_stage(run, "data", {"ok": True})
    path = tmp_path / "stages" / "data.json"  # the on-disk layout itself
    path.write_bytes(path.read_bytes()[:-5])
    damaged = path.read_bytes()
    assert run.read_stage("data") is None  # a reader (status, report) leaves it as it is
    assert path.read_bytes() == damaged
    assert run.read_stage("data", owner=True) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.json.corrupt"]


def test_restart_removes_artifacts_but_keeps_logs(tmp_path: Path) -> None:
    rundir.check_identity(tmp_path, IDENTITY, {})
    rundir.finish_stage(tmp_path, "fit", {})
    (tmp_path / "checkpoints" / "step-000000001").mkdir(parents=True)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "pipeline.log").write_text("log")
    with rundir.RunLock(tmp_path):
        rundir.restart(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", ".lock", "pipeline.log"]


def test_check_identity_accepts_keys_added_to_the_schema_at_their_default(tmp_path: Path) -> None:
    rundir.check_identity(tmp_path, {"model.name": "cnn"}, {})
    defaults = {"model.name": "???", "model.padding": "same"}
    rundir.check_identity(tmp_path, {"model.name": "cnn", "model.padding": "same"}, {}, defaults)
    with pytest.raises(ConfigError, match=r"model.padding: 'same' -> 'valid'"):
        rundir.check_identity(
            tmp_path, {"model.name": "cnn", "model.padding": "valid"}, {}, defaults
        )

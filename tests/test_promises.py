"""README promises that had no test of their own, each checked through the real CLI on small data
and asserted on the records a run leaves (stage records, checkpoint manifests, TensorBoard
events, exit codes) rather than on log wording, except where the wording is the promise."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SMALL, assert_same_state, cli, final_state, only_run_dir, start

from pipeline import checkpoint, durable, tblog
from pipeline.data import SAMPLE_PATH
from pipeline.rundir import RunDir

# A tiny MLP run: 240 training images in 4 steps an epoch, 60 for validation, 100 for test.
TINY = [
    "data=sample",
    "data.train_size=300",
    "data.val_fraction=0.2",
    "data.test_size=100",
    "fit.batch_size=60",
    "model=mlp",
    "fit.log_every_steps=2",
    "export.tflite=false",
    "export.h5=false",
]
# No network: Keras' download goes through a proxy on a local port where nothing listens.
OFFLINE = {
    **{
        key: "http://127.0.0.1:9"
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    },
    "NO_PROXY": "",
    "no_proxy": "",
}
OFFLINE_WARNING = "OFFLINE: could not download MNIST"


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Poll `predicate` (a look at files) until it holds; fail if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, "the process ended before it was expected to"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def record(path: Path) -> dict[str, Any]:
    return durable.read_record(path)


def latest_checkpoint(run_dir: Path) -> checkpoint.Checkpoint:
    root = run_dir / "checkpoints"
    return checkpoint.load(checkpoint.path_for(root, checkpoint.committed_steps(root)[-1]))


def loop_state(run_dir: Path) -> dict[str, Any]:
    """The loop state of the newest checkpoint, without what differs between sessions anyway
    (wall times and the list of resumes)."""
    loop = dict(latest_checkpoint(run_dir).meta["loop"])
    del loop["train_seconds"], loop["resumes"]
    loop["history"] = [
        {k: v for k, v in row.items() if k != "train_seconds"} for row in loop["history"]
    ]
    return loop


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------- 1. early stopping


def test_early_stopping_stops_and_its_patience_survives_a_kill(tmp_path: Path) -> None:
    # A learning rate of 1e-9 leaves every prediction as it is, so validation accuracy never
    # improves after epoch 1: with patience 2 the run must stop after epoch 3 of 8.
    args = [
        "train",
        *TINY,
        "optimizer=adam",
        "optimizer.learning_rate=1e-9",
        "fit.epochs=8",
        "fit.early_stopping_patience=2",
        "checkpoint.every_steps=0",  # one checkpoint per epoch, at its end
    ]
    (tmp_path / "reference").mkdir()
    result = cli(args, tmp_path / "reference")
    assert result.returncode == 0, result.stderr
    reference = only_run_dir(tmp_path / "reference" / "outputs")
    expected = loop_state(reference)
    assert expected["stopped_early"] is True
    assert expected["epoch"] == 3 and expected["global_step"] == 12  # not 8 epochs, 32 steps
    assert expected["epochs_without_improvement"] == 2 and expected["best_step"] == 4
    fit = record(reference / "stages" / "fit.json")
    assert fit["stopped_early"] is True and fit["epochs_done"] == 3

    # Killed right after epoch 2's checkpoint (the data cache is the first committed
    # directory), while the patience counter is 1.
    result = cli(args, tmp_path, env={"PIPELINE_FAILPOINT": "dir_after_rename@3"})
    assert result.returncode == -signal.SIGKILL, result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    killed = latest_checkpoint(run_dir).meta["loop"]
    assert (killed["epoch"], killed["epochs_without_improvement"]) == (2, 1)
    assert killed["stopped_early"] is False

    result = cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert checkpoint.committed_steps(run_dir / "checkpoints")[-1] == 12
    assert loop_state(run_dir) == expected
    fit = record(run_dir / "stages" / "fit.json")
    assert fit["stopped_early"] is True and fit["global_step"] == 12
    assert [r["step"] for r in fit["resumes"]] == [8]
    assert_same_state(final_state(reference), final_state(run_dir))


# ---------------------------------------------------------------- 2. time-based checkpoints


def test_every_seconds_checkpoints_mid_epoch(tmp_path: Path) -> None:
    every = 0.1
    result = cli(
        [
            "train",
            *TINY,
            "data.train_size=1200",  # 960 training images, batch 10: 96 steps an epoch
            "fit.batch_size=10",
            "fit.epochs=2",
            "checkpoint.every_steps=0",
            f"checkpoint.every_seconds={every}",
            "checkpoint.keep=1000",  # keep every one, to look at all of them
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    root = only_run_dir(tmp_path / "outputs") / "checkpoints"
    steps = checkpoint.committed_steps(root)
    mid_epoch = [s for s in steps if s % 96]
    assert mid_epoch, steps
    assert 96 in steps and 192 in steps  # the epoch ends, as always
    # Time-based, not every step: each mid-epoch checkpoint comes at least `every` seconds
    # after the one before it.
    times = {s: checkpoint.load(checkpoint.path_for(root, s)).meta["time"] for s in steps}
    for previous, step in zip(steps, steps[1:], strict=False):
        if step in mid_epoch:
            assert times[step] - times[previous] >= every * 0.95, (previous, step)


# ---------------------------------------------------------------- 3. fit.epochs and schedules


@pytest.mark.parametrize(
    ("schedule", "refused"),
    [("cosine", True), ("onecycle", True), ("constant", False), ("restarts", False)],
)
def test_raising_epochs_is_refused_only_under_stretched_schedules(
    tmp_path: Path, schedule: str, refused: bool
) -> None:
    args = [*TINY, "optimizer=adam", f"optimizer.schedule={schedule}"]
    for command in ("data", "fit"):  # a run trained for one epoch (no evaluate/export: faster)
        result = cli([command, *args, "fit.epochs=1"], tmp_path)
        assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    before = checkpoint.committed_steps(run_dir / "checkpoints")
    assert before[-1] == 4
    result = cli(["train" if refused else "fit", *args, "fit.epochs=2"], tmp_path)
    if refused:
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "was made with a different config (fit.epochs: 1 -> 2)" in lines[0]
        assert "run.name=<new name>" in lines[0] and "run.restart=true" in lines[0]
        assert checkpoint.committed_steps(run_dir / "checkpoints") == before
        assert record(run_dir / "stages" / "fit.json")["epochs"] == 1
    else:
        assert result.returncode == 0, result.stderr
        fit = record(run_dir / "stages" / "fit.json")
        assert fit["epochs"] == 2 and fit["global_step"] == 8
        assert [r["step"] for r in fit["resumes"]] == [4]  # continued, not started over
        assert latest_checkpoint(run_dir).meta["loop"]["epoch"] == 2


# ---------------------------------------------------------------- 4. a second Ctrl-C


def read_stderr_until(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> str:
    """Read the child's stderr as it comes until `text` appears; return what was read."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline, f"timed out waiting for {text!r}: {seen!r}"
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"stderr closed before {text!r} appeared: {seen.decode()}"
            seen += chunk
    return seen.decode()


def test_second_ctrl_c_quits_at_once(tmp_path: Path, reference_run: tuple[Path, str]) -> None:
    outputs = tmp_path / "outputs"

    def newest() -> int:
        roots = outputs.glob("*/checkpoints")
        return max((step for root in roots for step in checkpoint.committed_steps(root)), default=0)

    for _attempt in range(3):
        reached = newest()
        proc = start(["train", *SMALL], tmp_path)
        try:
            # Fit is running once it commits a checkpoint (every 3 steps of 30).
            wait_for(lambda reached=reached: newest() > reached, proc)
            proc.send_signal(signal.SIGINT)
            # The first one only asks fit to finish its step and save; once the process has
            # said so, the second one must stop it at once.
            first = read_stderr_until(proc, "press Ctrl-C again to quit at once")
            proc.send_signal(signal.SIGINT)
            _, rest = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr = first + rest
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        if "error: Interrupted by SIGINT; every committed file is intact." in stderr:
            break
        # This test was descheduled so long that the graceful stop (one step and a checkpoint)
        # finished before the second signal arrived; that is correct too. Try again.
        assert "Interrupted: checkpoint saved at step" in stderr, stderr
    else:
        pytest.fail("three times, the second SIGINT did not stop the process at once")
    assert "Run the same command again to resume." in stderr
    assert "Interrupted: checkpoint saved at step" not in stderr  # not the graceful path
    run_dir = only_run_dir(outputs)
    assert record(run_dir / "session.json")["state"] == "interrupted"
    assert not (run_dir / "stages" / "fit.json").exists()
    root = run_dir / "checkpoints"
    steps = checkpoint.committed_steps(root)
    assert steps and steps[-1] < 30
    for step in steps:
        checkpoint.load(checkpoint.path_for(root, step))  # raises CorruptArtifact if damaged

    result = cli(["train", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr
    assert_same_state(final_state(reference_run[0]), final_state(run_dir))
    ours = json.loads((run_dir / "metrics.json").read_text())
    theirs = json.loads((reference_run[0] / "metrics.json").read_text())
    assert ours["test_loss"] == theirs["test_loss"]
    assert not list(run_dir.rglob("*.tmp-*"))


def test_an_interruption_inside_a_keras_call_keeps_its_one_line() -> None:
    # The second Ctrl-C raises from the signal handler wherever the main thread is; once it
    # landed in the learning-rate schedule's cond and the user read Keras' rebuilt message
    # ("Exception encountered when calling Cond.call()", bold codes, the call's arguments).
    import keras
    import tensorflow as tf

    from pipeline.errors import Interrupted

    message = "Interrupted by SIGINT; every committed file is intact."

    def interrupted() -> Any:
        raise Interrupted(message)

    with pytest.raises(Interrupted) as caught:
        keras.ops.cond(tf.constant(True), interrupted, lambda: tf.constant(0))
    assert str(caught.value) == message


# ---------------------------------------------------------------- 5. resume/step in TensorBoard


def test_resume_step_scalar_marks_each_restart(tmp_path: Path) -> None:
    args = ["train", *SMALL, "model=mlp"]
    resumed_from = []
    for failpoint in ("dir_after_rename@3", "dir_after_rename@2"):
        result = cli(args, tmp_path, env={"PIPELINE_FAILPOINT": failpoint})
        assert result.returncode == -signal.SIGKILL, result.stderr
        run_dir = only_run_dir(tmp_path / "outputs")
        resumed_from.append(checkpoint.committed_steps(run_dir / "checkpoints")[-1])
    assert resumed_from[0] < resumed_from[1] < 30
    result = cli(args, tmp_path)
    assert result.returncode == 0, result.stderr

    events = tblog.scalars(run_dir / "tensorboard")["train/resume/step"]  # TensorBoard's loader
    assert events == [(step, float(step)) for step in resumed_from]
    assert [r["step"] for r in record(run_dir / "stages" / "fit.json")["resumes"]] == resumed_from


# ---------------------------------------------------------------- 6. predict's export version


def test_predict_uses_the_newest_export_that_verifies(tmp_path: Path) -> None:
    args = [*TINY, "optimizer=adam"]
    for epochs in (1, 2):  # more epochs, a new checkpoint: export publishes version 2
        result = cli(["train", *args, f"fit.epochs={epochs}"], tmp_path)
        assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    model_root = run_dir / "export" / "mnist"
    assert sorted(p.name for p in model_root.iterdir()) == ["1", "2"]
    shown = model_root.relative_to(tmp_path)  # predict names paths as given (outputs/...)
    step = {v: durable.verify_dir(model_root / v)["checkpoint_step"] for v in ("1", "2")}
    assert step == {"1": 4, "2": 8}
    label = int(RunDir(run_dir).prepared_data("y_test")["y_test"][0])

    def predict(name: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
        result = cli(["predict", *args, "--test-index", "0", "--json", name], tmp_path)
        assert result.returncode == 0, result.stderr
        return result, json.loads((tmp_path / name).read_text())

    _, report = predict("before.json")
    assert report["export"] == str(shown / "2") and report["checkpoint_step"] == 8

    # One flipped byte in version 2's model.keras, a file its MANIFEST lists but predict does
    # not read (it serves the SavedModel): only the manifest check can notice it.
    listed = record(model_root / "2" / durable.MANIFEST)["files"]
    damaged = model_root / "2" / "model.keras"
    assert "model.keras" in listed
    flip_byte(damaged)
    result, report = predict("after.json")
    assert report["export"] == str(shown / "1") and report["checkpoint_step"] == 4
    assert [(r["input"], r["label"]) for r in report["results"]] == [("test[0]", label)]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: export {shown / '2'} failed verification "
        f"({damaged.relative_to(tmp_path)}: sha256 mismatch (corrupted)); skipped"
    ]
    assert result.stdout.startswith("test[0]: class ")


# ---------------------------------------------------------------- 7. a sweep job refused


def test_sweep_job_on_a_run_held_by_another_process_fails_alone(tmp_path: Path) -> None:
    held = tmp_path / "outputs" / "held"
    held.mkdir(parents=True)
    fd = os.open(held / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what RunLock does in a running process
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01"}
        os.write(fd, json.dumps(holder).encode())
        # The held run comes first: its failure must not stop the sweep.
        result = cli(["train", "-m", "run.name=held,free", *TINY, "fit.epochs=1"], tmp_path)
    finally:
        os.close(fd)
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("error: run ")]
    assert len(failed) == 1, result.stderr
    assert "outputs/held failed: Run " in failed[0]
    assert f"outputs/held is in use by pid {os.getpid()} on {holder['host']}" in failed[0]
    assert "Traceback" not in result.stderr
    # The held run was left alone; the other one ran to the end.
    assert not (held / "run.json").exists() and not (held / "checkpoints").exists()
    assert json.loads((held / ".lock").read_text()) == holder
    free = tmp_path / "outputs" / "free"
    assert record(free / "session.json")["state"] == "done"
    assert record(free / "stages" / "export.json")["checkpoint_step"] == 4
    rows = json.loads(cli(["status", "--json"], tmp_path).stdout)
    assert [(row["name"], row["state"]) for row in rows] == [("free", "done")]


# ---------------------------------------------------------------- 8. offline MNIST


def test_offline_mnist_falls_back_to_the_bundled_sample_with_one_warning(tmp_path: Path) -> None:
    env = {**OFFLINE, "KERAS_HOME": str(tmp_path / "keras")}  # no cached mnist.npz there
    args = [
        "train",
        "data=mnist",
        "data.train_size=300",
        "data.test_size=100",
        "fit.batch_size=60",
        "model=mlp",
        "fit.epochs=1",
        "export.tflite=false",
        "export.h5=false",
    ]
    result = cli(args, tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count(OFFLINE_WARNING) == 1, output
    assert "pass data.path=/path/to/mnist.npz" in output  # how to get the full set
    run_dir = only_run_dir(tmp_path / "outputs")
    expected_source = f"bundled sample {SAMPLE_PATH.name} (offline)"
    assert record(run_dir / "stages" / "data.json")["source"] == expected_source
    cache = durable.verify_dir(RunDir(run_dir).data)
    assert cache["source"] == expected_source
    sample_hash = hashlib.sha256(durable.sha256_file(SAMPLE_PATH).encode()).hexdigest()
    assert cache["source_sha256"] == sample_hash  # the content really is the bundled sample
    ours = RunDir(run_dir).prepared_data("x_test")
    with np.load(SAMPLE_PATH) as sample:
        assert np.array_equal(ours["x_test"], sample["x_test"][:100])
    assert not list((tmp_path / "keras").rglob("mnist.npz"))


# ---------------------------------------------------------------- 9. Fashion-MNIST


def test_fashion_mnist_from_a_local_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "fashion.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 300, dtype=np.uint8),
        x_test=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 100, dtype=np.uint8),
    )
    args = [*TINY, "data=fashion_mnist", f"data.path={path}", "fit.epochs=1"]
    result = cli(["train", *args], tmp_path, env=OFFLINE)
    assert result.returncode == 0, result.stderr
    assert OFFLINE_WARNING not in result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    assert "data=fashion_mnist" in run_dir.name
    assert record(run_dir / "stages" / "data.json")["source"] == str(path)
    cache = durable.verify_dir(RunDir(run_dir).data)
    assert cache["recipe"]["name"] == "fashion_mnist"
    assert cache["source_sha256"] == hashlib.sha256(durable.sha256_file(path).encode()).hexdigest()
    fit = record(run_dir / "stages" / "fit.json")
    assert fit["epochs_done"] == 1 and fit["global_step"] == 4
    assert record(run_dir / "session.json")["state"] == "done"


def test_fashion_mnist_offline_fails_with_one_message(tmp_path: Path) -> None:
    env = {**OFFLINE, "KERAS_HOME": str(tmp_path / "keras")}
    result = cli(["train", *TINY, "data=fashion_mnist", "fit.epochs=1"], tmp_path, env=env)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: Could not download fashion_mnist (")
    assert "pass data.path=<file.npz or IDX dir>" in errors[0]
    assert "Traceback" not in result.stderr
    # No silent stand-in: MNIST digits are not Fashion-MNIST.
    assert OFFLINE_WARNING not in result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    assert not (run_dir / "data").exists() and not (run_dir / "stages" / "data.json").exists()
    session = record(run_dir / "session.json")
    assert session["state"] == "failed" and "fashion_mnist" in session["message"]

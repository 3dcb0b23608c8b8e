"""End to end: the real CLI, killed or interrupted, ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

from conftest import (
    SMALL,
    assert_runs_identical,
    assert_same_state,
    cli,
    final_state,
    only_run_dir,
    scalar_steps,
    start,
)

from pipeline import checkpoint, durable


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def checkpoints(outputs: Path) -> list[Path]:
    return sorted(outputs.glob("*/checkpoints/step-?????????"))


def loop_of_newest(run_dir: Path) -> dict:
    latest = checkpoint.load_latest(run_dir / "checkpoints")
    assert latest is not None
    return latest.meta["loop"]


def test_train_runs_every_stage(reference_run: tuple[Path, str]) -> None:
    run_dir, stdout = reference_run
    assert "Restored model, accuracy: " in stdout
    stages = sorted(p.stem for p in (run_dir / "stages").glob("*.json"))
    assert stages == ["data", "evaluate", "export", "fit", "model"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["checkpoint_step"] == 30 and metrics["test_images"] == 200
    version = run_dir / "export" / "mnist" / "1"
    assert (version / "saved_model.pb").is_file() and (version / "model.keras").is_file()
    assert scalar_steps(run_dir, "train/batch_loss") == list(range(2, 31, 2))


def test_rerun_skips_finished_stages(tmp_path: Path, reference_run: tuple[Path, str]) -> None:
    run_dir = tmp_path / "outputs" / reference_run[0].name
    shutil.copytree(reference_run[0], run_dir)  # the shared reference run stays as it is
    before = final_state(run_dir)
    result = cli(["train", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fit: done (3 epochs, step 30); skipped" in result.stdout
    assert "evaluate: done" in result.stdout
    assert "already holds checkpoint step 30" in result.stdout
    assert_same_state(before, final_state(run_dir))
    assert not (run_dir / "export" / "mnist" / "2").exists()


def test_kills_inside_checkpoint_writes_resume_bit_identical(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    # Killed right after a checkpoint commit, then inside the next session's third write
    # (before its rename), then inside a manifest write.
    for failpoint in ("dir_after_rename@4", "dir_before_rename@3", "dir_before_manifest@2"):
        result = cli(["train", *SMALL], tmp_path, env={"PIPELINE_FAILPOINT": failpoint})
        assert result.returncode == -signal.SIGKILL, (failpoint, result.stderr)
    # Then a plain SIGKILL while fitting: as soon as a checkpoint newer than every one present
    # at launch is committed, the process is mid-fit (no sleep decides where it lands).
    run_dir = only_run_dir(tmp_path / "outputs")
    before = checkpoint.committed_steps(run_dir / "checkpoints")
    proc = start(["train", *SMALL], tmp_path)
    wait_for(lambda: checkpoint.committed_steps(run_dir / "checkpoints")[-1:] > before[-1:])
    proc.kill()
    proc.wait()
    killed_after = checkpoint.committed_steps(run_dir / "checkpoints")[-1]
    assert killed_after < 30, "the kill landed after fit had finished"
    result = cli(["train", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr
    resumed = [r["step"] for r in loop_of_newest(run_dir)["resumes"]]
    assert len(resumed) == 4 and resumed[-1] == killed_after, resumed
    assert_runs_identical(reference_run[0], run_dir)
    assert scalar_steps(run_dir, "train/batch_loss") == scalar_steps(
        reference_run[0], "train/batch_loss"
    )
    assert scalar_steps(run_dir, "validation/epoch_accuracy") == [10, 20, 30]
    assert not list(run_dir.rglob("*.tmp-*"))


def test_kill_mid_export_publishes_no_partial_version(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    result = cli(["train", *SMALL], tmp_path, env={"PIPELINE_FAILPOINT": "export_before_publish"})
    assert result.returncode == -signal.SIGKILL
    run_dir = only_run_dir(tmp_path / "outputs")
    model_root = run_dir / "export" / "mnist"
    assert [p.name for p in model_root.iterdir() if not p.name.startswith(".")] == []
    status = json.loads(cli(["status", "--json"], tmp_path).stdout)[0]
    assert status["state"] == "interrupted"
    assert status["stages_done"] == ["data", "model", "fit", "evaluate"]
    result = cli(["train", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fit: done" in result.stdout
    assert sorted(p.name for p in model_root.iterdir()) == ["1"]
    assert_runs_identical(reference_run[0], run_dir)
    status = json.loads(cli(["status", "--json"], tmp_path).stdout)[0]
    assert status["state"] == "done" and "export" in status["stages_done"]


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    # No periodic checkpoints: the one written on SIGINT is what the resume starts from.
    args = [*SMALL, "checkpoint.every_steps=0"]
    proc = start(["train", *args], tmp_path)
    wait_for(lambda: len(checkpoints(tmp_path / "outputs")) >= 1)  # end of epoch 1
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    saved = checkpoint.committed_steps(run_dir / "checkpoints")[-1]
    assert f"Interrupted: checkpoint saved at step {saved} " in stderr
    assert "Run the same command again to resume." in stderr
    assert "Traceback" not in stderr
    assert durable.read_record(run_dir / "session.json")["state"] == "interrupted"
    result = cli(["train", *args], tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in loop_of_newest(run_dir)["resumes"]] == [saved]
    assert_same_state(final_state(reference_run[0]), final_state(run_dir))


def test_second_process_on_the_same_run_is_refused(tmp_path: Path) -> None:
    # Long enough that the first process is still training when it is killed: SMALL's 3 epochs
    # can end before the second process and `status` have run.
    args = [*SMALL, "fit.epochs=100000"]
    proc = start(["train", *args], tmp_path)
    try:
        wait_for(lambda: any((tmp_path / "outputs").glob("*/run.json")))
        result = cli(["train", *args], tmp_path)
        assert result.returncode == 3
        assert "is in use by pid " + str(proc.pid) in result.stderr
        assert "Traceback" not in result.stderr
        status = json.loads(cli(["status", "--json"], tmp_path).stdout)[0]
        assert status["state"] == "running"
    finally:
        proc.kill()
        proc.wait()
    status = json.loads(cli(["status", "--json"], tmp_path).stdout)[0]
    assert status["state"] == "interrupted"  # the kernel dropped the dead process's lock


def test_incompatible_change_is_refused_and_restart_starts_over(tmp_path: Path) -> None:
    # Restarts: a raised fit.epochs continues the run (the default's cosine is stretched over it).
    base = [*SMALL, "run.name=mine", "fit.epochs=1", "model=mlp", "optimizer=adam_restarts"]
    assert cli(["fit", *base], tmp_path).returncode == 2  # no run yet: fit needs one
    assert cli(["train", *base], tmp_path).returncode == 0
    result = cli(["train", *base, "model.dropout=0.5"], tmp_path)
    assert result.returncode == 2
    assert "model.dropout: 0.2 -> 0.5" in result.stderr
    assert "run.restart=true" in result.stderr and "run.name=<new name>" in result.stderr
    # A compatible change: more epochs continue the same run.
    result = cli(["train", *base, "fit.epochs=2"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Fit: resuming from step-000000010" in result.stdout
    assert json.loads((tmp_path / "outputs/mine/metrics.json").read_text())["checkpoint_step"] == 20
    result = cli(["train", *base, "model.dropout=0.5", "run.restart=true"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Fit: resuming" not in result.stdout


def test_evaluate_best_on_an_existing_run(tmp_path: Path, reference_run: tuple[Path, str]) -> None:
    run_dir = tmp_path / "outputs" / reference_run[0].name
    shutil.copytree(reference_run[0], run_dir)  # the shared reference run stays as it is
    result = cli(["evaluate", *SMALL, "evaluate.checkpoint=best"], tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["checkpoint"] == "best"
    assert f"Restored model, accuracy: {100 * metrics['test_accuracy']:5.2f}%" in result.stdout


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # Adam's first step at lr 1e30 is computed on sane weights (finite loss, checkpointed at
    # step 1); from step 2 on the loss is not finite. The step-1 checkpoint must be what is kept.
    args = [*SMALL, "model=mlp", "optimizer.learning_rate=1e30", "checkpoint.every_steps=1"]
    args += ["optimizer.warmup_epochs=0"]  # the default's warm-up starts at a learning rate of 0
    result = cli(["train", *args], tmp_path)
    assert result.returncode == 1
    assert "The training loss became NaN or infinite at step 2;" in result.stderr
    assert "The last good checkpoint (step 1) is kept." in result.stderr
    assert "Traceback" not in result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    assert checkpoint.committed_steps(run_dir / "checkpoints") == [1]
    kept = checkpoint.load_latest(run_dir / "checkpoints")
    assert kept is not None and kept.step == 1
    assert durable.read_record(run_dir / "session.json")["state"] == "failed"


def test_augmented_mlp_resumes_bit_identical(tmp_path: Path) -> None:
    # Random shifts and dropout: every random choice must come back exactly after a kill.
    args = [*SMALL, "model=mlp", "fit.augment_shift=2"]
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    assert cli(["train", *args], reference_dir).returncode == 0
    result = cli(["train", *args], tmp_path, env={"PIPELINE_FAILPOINT": "dir_after_rename@5"})
    assert result.returncode == -signal.SIGKILL
    result = cli(["train", *args], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Fit: resuming from step-000000010" in result.stdout
    assert_same_state(
        final_state(only_run_dir(reference_dir / "outputs")),
        final_state(only_run_dir(tmp_path / "outputs")),
    )


def test_evaluate_in_a_fresh_process_gives_the_same_bits(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    # The reference evaluated in the process that ran fit; here a new process evaluates the same
    # checkpoint. Every stage must compute the same bits in any process.
    run_dir = tmp_path / "outputs" / reference_run[0].name
    shutil.copytree(reference_run[0], run_dir)
    for name in ("stages/evaluate.json", "stages/export.json", "metrics.json"):
        (run_dir / name).unlink()
    result = cli(["evaluate", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr
    ours = json.loads((run_dir / "metrics.json").read_text())
    theirs = json.loads((reference_run[0] / "metrics.json").read_text())
    assert (ours["test_loss"], ours["test_accuracy"]) == (
        theirs["test_loss"],
        theirs["test_accuracy"],
    )


def test_finished_fit_with_a_damaged_final_checkpoint_is_resumed_not_trusted(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    run_dir = tmp_path / "outputs" / reference_run[0].name
    shutil.copytree(reference_run[0], run_dir)
    final = checkpoint.path_for(run_dir / "checkpoints", 30)
    state = final / "state.npz"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    state.write_bytes(bytes(raw))
    result = cli(["train", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (final.parent / f"{final.name}.corrupt").is_dir()
    resumed = [r["step"] for r in loop_of_newest(run_dir)["resumes"]]
    assert resumed == [27], resumed  # the newest good checkpoint before the damaged one
    # In full: resuming cut evaluate's TensorBoard events, so evaluate must have run again.
    assert_runs_identical(reference_run[0], run_dir)


def test_two_sessions_resuming_from_the_same_step_mark_it_once(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    # The first session commits step 6 and dies; the second resumes from 6 and dies inside its
    # first checkpoint write, after its resume marker reached the event file; the third resumes
    # from 6 again. TensorBoard must still see step 6 once.
    for failpoint in ("dir_after_rename@3", "dir_before_rename@1"):
        result = cli(["train", *SMALL], tmp_path, env={"PIPELINE_FAILPOINT": failpoint})
        assert result.returncode == -signal.SIGKILL, (failpoint, result.stderr)
    result = cli(["train", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    assert scalar_steps(run_dir, "train/resume/step") == [6]
    assert_runs_identical(reference_run[0], run_dir)

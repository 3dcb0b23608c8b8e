"""Resource faults and bad input, through the real CLI: one clear message, a non-zero exit,
nothing committed lost, and a rerun that ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
from conftest import SMALL, assert_same_state, cli, final_state, only_run_dir, shared_mnist, start

from pipeline import checkpoint, durable


def committed(run_dir: Path) -> list[int]:
    return checkpoint.committed_steps(run_dir / "checkpoints")


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path: Path) -> None:
    # Restarts: a raised fit.epochs continues the run (the default's cosine is stretched over it,
    # so raising it there is a new run); the uninterrupted run to compare with is made here.
    args = [*SMALL, "optimizer=adam_restarts"]
    (tmp_path / "reference").mkdir()
    assert cli(["train", *args], tmp_path / "reference").returncode == 0
    assert cli(["train", *args, "fit.epochs=1"], tmp_path).returncode == 0
    run_dir = only_run_dir(tmp_path / "outputs")
    result = cli(["train", *args], tmp_path, max_file_bytes=1_000_000)
    assert result.returncode == 1, result.stderr
    needed = sum(a.nbytes for a in final_state(run_dir).values()) / 1e6
    assert (
        f"error: No space left writing {run_dir}/checkpoints/step-000000012: it needs "
        f"{needed:.1f} MB"
    ) in result.stderr
    assert "nothing committed was lost" in result.stderr
    assert "Traceback" not in result.stderr
    assert committed(run_dir) == [6, 9, 10]  # keep=3: nothing newer appeared
    durable.verify_dir(checkpoint.path_for(run_dir / "checkpoints", 10))
    assert not list(run_dir.rglob("*.tmp-*"))
    result = cli(["train", *args], tmp_path)
    assert result.returncode == 0, result.stderr
    reference = only_run_dir(tmp_path / "reference" / "outputs")
    assert_same_state(final_state(reference), final_state(run_dir))


def test_disk_full_while_caching_data(tmp_path: Path) -> None:
    result = cli(["data", *SMALL], tmp_path, max_file_bytes=100_000)
    assert result.returncode == 1
    run_dir = only_run_dir(tmp_path / "outputs")
    cache = tmp_path / "outputs" / ".cache" / "data"
    assert f"error: No space left writing {cache.relative_to(tmp_path)}/" in result.stderr
    assert ": it needs 0.6 MB" in result.stderr
    assert not list(cache.iterdir()) or all(p.name.endswith(".lock") for p in cache.iterdir())
    assert not list(run_dir.rglob("*.tmp-*"))
    assert cli(["data", *SMALL], tmp_path).returncode == 0


def test_disk_full_while_exporting_publishes_nothing(tmp_path: Path) -> None:
    result = cli(
        ["train", *SMALL, "model=mlp"],
        tmp_path,
        env={"PIPELINE_FAILPOINT": "export_before_publish"},
    )
    assert result.returncode == -signal.SIGKILL
    run_dir = only_run_dir(tmp_path / "outputs")
    result = cli(["export", *SMALL, "model=mlp"], tmp_path, max_file_bytes=1_000_000)
    assert result.returncode == 1
    assert f"error: No space left writing {run_dir}/export/mnist/1: it needs" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((run_dir / "export" / "mnist").iterdir())
    result = cli(["export", *SMALL, "model=mlp"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "export" / "mnist" / "1" / "saved_model.pb").is_file()


def test_outputs_not_writable(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    result = cli(["train", *SMALL, f"run.outputs={tmp_path / 'afile'}"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: Cannot write to the run directory {tmp_path}/afile/")
    assert "(Not a directory)" in result.stderr and "run.outputs=<dir>" in result.stderr
    result = cli(["train", *SMALL, "run.outputs=/proc/pipeline-outputs"], tmp_path)
    assert result.returncode == 1 and "Cannot write to the run directory" in result.stderr


def test_missing_and_damaged_data_files(tmp_path: Path) -> None:
    result = cli(["train", *SMALL, "data=mnist", "data.path=/nonexistent/mnist.npz"], tmp_path)
    assert result.returncode == 1
    assert "error: data.path=/nonexistent/mnist.npz does not exist." in result.stderr
    source = Path(__file__).resolve().parent.parent / "pipeline/sample/mnist_sample.npz"
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(source.read_bytes()[:50_000])
    result = cli(["train", *SMALL, "data=mnist", f"data.path={truncated}"], tmp_path)
    assert result.returncode == 1
    assert f"error: {truncated} cannot be read as .npz" in result.stderr
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((3, 28, 28), np.uint8))
    result = cli(["train", *SMALL, "data=mnist", f"data.path={wrong}"], tmp_path)
    assert result.returncode == 1
    assert (
        "is not a Keras-layout MNIST file: keys ['x_train', 'y_train', 'x_test', 'y_test']"
        in result.stderr
    )
    for res in (result,):
        assert "Traceback" not in res.stderr


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    result = cli(["train", *SMALL], tmp_path, env={"PIPELINE_FAILPOINT": "dir_after_rename@6"})
    assert result.returncode == -signal.SIGKILL
    run_dir = only_run_dir(tmp_path / "outputs")
    steps = committed(run_dir)
    newest = checkpoint.path_for(run_dir / "checkpoints", steps[-1])
    state = newest / "state.npz"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    state.write_bytes(bytes(raw))
    result = cli(["train", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Checkpoint {newest} failed verification: {state}: sha256 mismatch" in result.stdout
    assert f"Fit: resuming from step-{steps[-2]:09d}" in result.stdout
    assert (newest.parent / f"{newest.name}.corrupt").is_dir()  # kept as evidence
    assert_same_state(final_state(reference_run[0]), final_state(run_dir))


def test_damaged_run_record_and_hydra_config(tmp_path: Path) -> None:
    args = [*SMALL, "model=mlp", "fit.epochs=1"]
    assert cli(["train", *args], tmp_path).returncode == 0
    run_dir = only_run_dir(tmp_path / "outputs")
    (run_dir / ".hydra" / "config.yaml").write_text("{{{ not yaml")
    result = cli(["train", *args], tmp_path)  # Hydra rewrites its own copy; ours is run.json
    assert result.returncode == 0, result.stderr
    record = run_dir / "run.json"
    record.write_text(record.read_text().replace('"mlp"', '"cnn"'))
    result = cli(["train", *args], tmp_path)
    assert result.returncode == 1
    assert f"error: {record} is damaged ({record}: checksum mismatch)" in result.stderr
    assert "run.restart=true" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_checkpoints_and_exits_143(tmp_path: Path, reference_run: tuple[Path, str]) -> None:
    args = [*SMALL, "checkpoint.every_steps=0"]
    proc = start(["train", *args], tmp_path)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "outputs").glob("*/checkpoints/step-*")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "SIGTERM: finishing this step and saving a checkpoint" in stderr
    assert "Interrupted: checkpoint saved at step" in stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    saved = checkpoint.committed_steps(run_dir / "checkpoints")[-1]
    assert f"Interrupted: checkpoint saved at step {saved} " in stderr
    assert json.loads(cli(["status", "--json"], tmp_path).stdout)[0]["state"] == "interrupted"
    assert cli(["train", *args], tmp_path).returncode == 0
    # The rerun resumed from the step saved on the signal, and nowhere else.
    latest = checkpoint.load_latest(run_dir / "checkpoints")
    assert latest is not None and [r["step"] for r in latest.meta["loop"]["resumes"]] == [saved]
    assert_same_state(final_state(reference_run[0]), final_state(run_dir))


def test_source_changed_under_a_run_is_refused(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parent.parent / "pipeline/sample/mnist_sample.npz"
    copy = tmp_path / "mnist.npz"
    shutil.copy(source, copy)
    args = [*SMALL, "data=mnist", f"data.path={copy}", "model=mlp", "fit.epochs=1"]
    args += ["optimizer=adam_restarts"]  # restarts: a raised fit.epochs continues the run
    assert cli(["train", *args], tmp_path).returncode == 0
    with np.load(source) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["y_train"] = (arrays["y_train"] + 1) % 10
    np.savez(copy, **arrays)
    result = cli(["train", *args, "fit.epochs=2"], tmp_path)
    assert result.returncode == 1
    assert "error: The data source changed under this run:" in result.stderr


def test_shared_mnist_is_the_real_file() -> None:
    assert (
        durable.sha256_file(shared_mnist())
        == "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"
    )

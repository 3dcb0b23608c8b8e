"""A disk that fails: I/O errors and a full disk at any write end in one clear line, and a
filesystem without locking is refused in one line (faultfs, scripts/faultfs.py).

The campaigns (scripts/crash_test.py --disk-faults, --power-cut, --readers) are in
test_campaigns.py. Needs fuse3 and mfusepy: without them these tests fail, they do not skip.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import cli, faultfs


def test_filesystem_without_locking_is_refused_in_one_line(
    fs: faultfs.FaultFS, tmp_path: Path
) -> None:
    fs.no_flock()
    result = cli(["train", "data=sample", f"run.outputs={fs.mount / 'outputs'}"], tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: The filesystem of ")
    assert "does not support file locking" in lines[0]
    assert "Put run.outputs on a local disk" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "unexpected" not in result.stderr
    # `status` still reads the run (it cannot tell whether someone holds it).
    status = cli(["status", f"run.outputs={fs.mount / 'outputs'}", "--json"], tmp_path)
    assert status.returncode == 0, status.stderr


# ----- a library's error for a failing disk, turned into an OSError naming the file -------


def test_os_error_in_reads_tensorflow_and_h5py_messages(tmp_path: Path) -> None:
    from pipeline import durable

    variables = tmp_path / "run,a=1" / "variables"
    variables.mkdir(parents=True)
    tf_message = (
        "{{function_node __wrapped__MergeV2Checkpoints_device_/job:localhost/replica:0/task:0/"
        f"device:CPU:0}}}} {variables}/variables.index; Input/output error [Op:MergeV2Checkpoints]"
    )
    found = durable.os_error_in(RuntimeError(tf_message))
    assert found is not None and found.errno == errno.EIO
    assert found.filename == f"{variables}/variables.index"  # not /job:..., and commas kept
    h5py = RuntimeError(
        "Can't decrement id ref count (unable to close file, errno = 28, error message = "
        "'No space left on device')"
    )
    found = durable.os_error_in(h5py, near=variables)
    assert found is not None and found.errno == errno.ENOSPC and found.filename == str(variables)
    wrapped = ValueError("could not load")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error", "/x/y")
    assert durable.os_error_in(wrapped) is wrapped.__cause__
    assert durable.os_error_in(ValueError("Input/output shapes differ")) is None


def test_masked_read_error_in_a_directory_write_names_the_file(fs: faultfs.FaultFS) -> None:
    """Keras reports an unreadable .keras file as "File not found": write_dir reads back what
    the fill wrote and reports the disk's error instead, naming the file."""
    from pipeline import durable

    final = fs.mount / "export" / "1"

    def fill(tmp: Path) -> None:
        (tmp / "model.keras").write_bytes(b"zip" * 1000)
        fs.fault("read,open", "*/model.keras", "EIO", every=True)
        raise ValueError(f"File not found: filepath={tmp / 'model.keras'}")

    with pytest.raises(OSError) as info:
        durable.write_dir(final, fill)
    assert info.value.errno == errno.EIO
    assert str(info.value.filename).endswith("/model.keras")
    fs.clear_faults()
    assert os.listdir(final.parent) == []  # nothing committed, no temporary left


def test_failed_event_write_names_the_event_file(fs: faultfs.FaultFS) -> None:
    from pipeline import tblog

    events = tblog.EventLog(fs.mount / "tensorboard")
    fs.fault("fsync", "*/events.out.tfevents.*", "EIO")
    events.scalar("train/loss", 1.0, 1)
    with pytest.raises(OSError) as info:
        events.sync()
    assert info.value.filename == str(events.path)


# ----- the CLI on a failing disk: one `error:` line naming the path, exit 1 -----------------

DATA = ["data", "data=sample", "data.train_size=200", "data.test_size=100"]


@pytest.mark.parametrize(
    ("op", "glob", "errno_name", "names"),
    [
        ("write", "*/pipeline.log", "EIO", "/pipeline.log: Input/output error"),
        ("create", "*/pipeline.log", "EIO", "/pipeline.log: Input/output error"),
        ("create", "*/.hydra/config.yaml", "EIO", "/.hydra/config.yaml: Input/output error"),
        ("flush", "*/.hydra/overrides.yaml", "EIO", ",data=sample: Input/output error"),
        ("write", "*/.cache/data/.*.tmp-*/prepared.npz", "ENOSPC", "No space left writing "),
        ("fsync", "*/stages/.data.tmp-*.json", "EIO", "/stages/data.json: Input/output error"),
        ("truncate", "*/.lock", "EIO", "/.lock: Input/output error"),
    ],
)
def test_cli_on_a_failing_disk_prints_one_line(
    fs: faultfs.FaultFS, tmp_path: Path, op: str, glob: str, errno_name: str, names: str
) -> None:
    outputs = fs.mount / "outputs"
    fs.fault(op, glob, errno_name, every=True)
    result = cli([*DATA, f"run.outputs={outputs}"], tmp_path)
    errors = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1, result.stderr
    assert names in errors[0] and str(outputs) in errors[0], errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert "unexpected" not in result.stderr
    fs.clear_faults()
    rerun = cli([*DATA, f"run.outputs={outputs}"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr


def test_status_on_a_failing_disk_prints_one_line(fs: faultfs.FaultFS, tmp_path: Path) -> None:
    outputs = fs.mount / "outputs"
    assert cli([*DATA, f"run.outputs={outputs}"], tmp_path).returncode == 0
    fs.fault("read", "*/session.json", "EIO", every=True)
    result = cli(["status", f"run.outputs={outputs}"], tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: I/O error on ") and "/session.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_pre_check_on_a_failing_disk_prints_one_line(fs: faultfs.FaultFS, tmp_path: Path) -> None:
    """The pre-check reads run.json (is this directory a run of ours?) before Hydra starts:
    a read error there is one line too (found by --disk-faults: it was a traceback)."""
    outputs = fs.mount / "outputs"
    assert cli([*DATA, f"run.outputs={outputs}"], tmp_path).returncode == 0
    fs.fault("open", "*/run.json", "EIO", every=True)
    result = cli([*DATA, f"run.outputs={outputs}"], tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: I/O error on "), lines
    assert lines[0].split(":")[1].strip().endswith("/run.json"), lines
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("op", ["write", "read"])
def test_failing_hdf5_export_is_one_line_not_a_crash(
    fs: faultfs.FaultFS, tmp_path: Path, op: str
) -> None:
    """HDF5 segfaults when its own writes fail (found by --disk-faults): model.h5 is written
    and read back with plain Python I/O, so a failing disk is one error line naming it."""
    outputs = fs.mount / "outputs"
    args = ["train", "data=sample", "data.train_size=300", "data.test_size=100", "model=mlp"]
    args += ["fit.epochs=1", "export.tflite=false", f"run.outputs={outputs}"]
    fs.fault(op, "*/model.h5", "EIO", every=True)
    result = cli(args, tmp_path)
    assert result.returncode == 1, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "/model.h5: Input/output error" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    fs.clear_faults()
    assert cli(args, tmp_path).returncode == 0


def test_a_write_probe_left_by_a_failing_disk_is_not_taken_for_a_users_file(
    fs: faultfs.FaultFS, tmp_path: Path
) -> None:
    """The pre-check's write probe could not be deleted (found by --disk-faults: the next start
    then refused the run directory as not ours): it is named as our temporary."""
    outputs = fs.mount / "outputs"
    fs.fault("unlink", "*/.write-probe*", "EIO")
    failed = cli([*DATA, f"run.outputs={outputs}"], tmp_path)
    assert failed.returncode == 1 and failed.stderr.startswith("error: Cannot write"), failed.stderr
    fs.clear_faults()
    rerun = cli([*DATA, f"run.outputs={outputs}"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr


def test_read_error_never_sets_a_sound_checkpoint_aside(fs: faultfs.FaultFS) -> None:
    """An I/O error while reading a checkpoint is the disk's, not the checkpoint's: the
    command fails naming the file, and the checkpoint stays (found by --disk-faults: a sound
    checkpoint was renamed to .corrupt and its step recomputed)."""
    import numpy as np

    from pipeline import checkpoint

    root = fs.mount / "checkpoints"
    checkpoint.save(root, 4, {"w": np.arange(1000, dtype=np.float32)}, {"loop": {}})
    # The manifest unreadable; or state.npz verified, then failing when numpy opens it.
    for op, pattern, nth in (("read", "*/MANIFEST.json", 1), ("open", "*/state.npz", 2)):
        fs.fault(op, pattern, "EIO", nth=nth, every=True)
        with pytest.raises(OSError) as info:
            checkpoint.load_latest(root)
        assert info.value.errno == errno.EIO and str(info.value.filename).startswith(str(root))
        fs.clear_faults()
        assert os.listdir(root) == ["step-000000004"]
    assert checkpoint.load_latest(root) is not None

"""pipeline.durable on a disk that loses power right after each primitive returns.

Runs durable.py's primitives on faultfs (scripts/faultfs.py, strict model: data that was not
fsynced and directory entries whose directory was not fsynced are dropped at a cut), cuts the
power as soon as the call returns, and checks that what it promised is there. Each of
durable.py's fsyncs is needed by one of these tests: scripts/mutation_check.py removes them one
at a time (fsync-dir, file-fsync, commit-file-fsync, manifest-fsync, tmp-dir-fsync) and these
tests must then fail. Needs fuse3 and mfusepy: without them they fail, they do not skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import faultfs

from pipeline import checkpoint, durable

# A default cut drops every pending item; seeded cuts keep a random half of them (other legal
# crash states). After a primitive returns, every one of them must show its result.
CUTS = [None, 1, 2]


@pytest.fixture(autouse=True)
def no_failpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_FAILPOINT", raising=False)


def blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("seed", CUTS)
def test_write_bytes_new_file_in_new_directories(fs: faultfs.FaultFS, seed: int | None) -> None:
    target = fs.mount / "run" / "stages" / "blob.bin"
    data = blob(300_000)
    durable.write_bytes(target, data)
    fs.cut(seed)
    assert target.read_bytes() == data
    assert sorted(os.listdir(target.parent)) == ["blob.bin"]


def test_run_directory_made_by_a_plain_mkdir_is_made_durable(fs: faultfs.FaultFS) -> None:
    """Hydra creates the run directory with a plain mkdir; the pipeline syncs it and its
    ancestors (durable.sync_ancestors) before committing anything inside it."""
    run = fs.mount / "outputs" / "run"
    run.mkdir(parents=True)
    durable.sync_ancestors(run)
    durable.write_record(run / "run.json", {"identity": 1})
    fs.cut()
    assert durable.read_record(run / "run.json") == {"identity": 1}


@pytest.mark.parametrize("seed", CUTS)
def test_write_bytes_replaces_a_durable_file(fs: faultfs.FaultFS, seed: int | None) -> None:
    target = fs.mount / "metrics.json"
    target.write_bytes(b"old content, made durable by the disk itself")
    fs.sync()
    durable.write_bytes(target, b"new content")
    fs.cut(seed)
    assert target.read_bytes() == b"new content"
    assert os.listdir(fs.mount) == ["metrics.json"]


def test_write_record_survives(fs: faultfs.FaultFS) -> None:
    target = fs.mount / "run" / "session.json"
    durable.write_record(target, {"state": "running"})
    durable.write_record(target, {"state": "done", "step": 60})
    fs.cut()
    assert durable.read_record(target) == {"state": "done", "step": 60}


def fill_export_like(tmp: Path) -> None:
    """Files at two depths, like a SavedModel (saved_model.pb, variables/...)."""
    (tmp / "saved_model.pb").write_bytes(blob(50_000, 1))
    (tmp / "variables").mkdir()
    (tmp / "variables" / "variables.data-00000-of-00001").write_bytes(blob(200_000, 2))
    (tmp / "variables" / "variables.index").write_bytes(blob(300, 3))


@pytest.mark.parametrize("seed", CUTS)
def test_write_dir_verifies_after_the_cut(fs: faultfs.FaultFS, seed: int | None) -> None:
    final = fs.mount / "run" / "export" / "mnist" / "1"
    durable.write_dir(final, fill_export_like, {"checkpoint_step": 60})
    fs.cut(seed)
    assert durable.verify_dir(final) == {"checkpoint_step": 60}
    assert (final / "variables" / "variables.data-00000-of-00001").read_bytes() == blob(200_000, 2)
    assert os.listdir(final.parent) == ["1"]


@pytest.mark.parametrize("seed", CUTS)
def test_checkpoint_save_loads_after_the_cut(fs: faultfs.FaultFS, seed: int | None) -> None:
    root = fs.mount / "run" / "checkpoints"
    arrays = {"w": np.arange(50_000, dtype=np.float32), "step": np.int64(8)}
    checkpoint.save(root, 4, {"w": arrays["w"] * 0, "step": np.int64(4)}, {"loop": {}})
    checkpoint.save(root, 8, arrays, {"loop": {"epoch": 1}})
    fs.cut(seed)
    latest = checkpoint.load_latest(root)
    assert latest is not None and latest.step == 8
    assert np.array_equal(latest.arrays["w"], arrays["w"])
    assert latest.meta["loop"] == {"epoch": 1}
    assert checkpoint.committed_steps(root) == [4, 8]
    assert not list(root.glob("*.corrupt*"))


@pytest.mark.parametrize("seed", CUTS)
def test_retained_checkpoints_stay_deleted(fs: faultfs.FaultFS, seed: int | None) -> None:
    root = fs.mount / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save(root, step, {"w": np.full(1000, step, np.float32)}, {"loop": {}})
    checkpoint.retain(root, keep=1, best_step=None)
    fs.cut(seed)
    # No half-deleted checkpoint under a committed name (it would fail verification); what is
    # left of the deleted ones is temporary debris, which the next session removes.
    assert checkpoint.committed_steps(root) == [3]
    durable.remove_temps(root)
    assert os.listdir(root) == ["step-000000003"]


@pytest.mark.parametrize("seed", CUTS)
def test_set_aside_survives(fs: faultfs.FaultFS, seed: int | None) -> None:
    bad = fs.mount / "checkpoints" / "step-000000004"
    bad.mkdir(parents=True)
    (bad / "state.npz").write_bytes(b"damaged")
    fs.sync()
    moved = durable.set_aside(bad)
    fs.cut(seed)
    assert moved.name == "step-000000004.corrupt"
    assert os.listdir(bad.parent) == [moved.name]
    assert (moved / "state.npz").read_bytes() == b"damaged"


def test_event_log_survives_up_to_its_last_sync(fs: faultfs.FaultFS) -> None:
    from pipeline import tblog

    logdir = fs.mount / "run" / "tensorboard"
    events = tblog.EventLog(logdir)
    for step in range(1, 5):
        events.scalar("train/loss", 1.0 / step, step)
    events.sync()
    events.scalar("train/loss", 0.1, 5)  # written, never synced: may be lost
    events.flush()
    events._file.close()  # the process dies: no close() (which would sync)
    fs.cut()
    files = tblog.event_files(logdir)
    assert len(files) == 1
    assert [e.step for e in read_events(files[0])] == [0, 1, 2, 3, 4]


def read_events(path: Path) -> list:
    """TFRecords read by hand (TensorBoard's loader would import TensorFlow: seconds)."""
    import struct

    from tensorboard.compat.proto.event_pb2 import Event

    data, pos, events = path.read_bytes(), 0, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return events

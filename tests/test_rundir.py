"""pipeline.rundir.RunDir: the layout of a run directory and its verified, read-only readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import checkpoint, durable, rundir
from pipeline.rundir import PREPARED, RunDir


def test_the_layout_on_disk(tmp_path: Path) -> None:
    """The names are the run directory's on-disk format: they never change."""
    run = RunDir(tmp_path)
    assert {
        "lock": run.lock,
        "run_record": run.run_record,
        "session": run.session,
        "stage": run.stage("fit"),
        "data": run.data,
        "model_summary": run.model_summary,
        "checkpoints": run.checkpoints,
        "tensorboard": run.tensorboard,
        "metrics": run.metrics,
        "predictions": run.predictions,
        "report": run.report,
        "export_version": run.export_version("mnist", 3),
        "log": run.log,
    } == {
        "lock": tmp_path / ".lock",
        "run_record": tmp_path / "run.json",
        "session": tmp_path / "session.json",
        "stage": tmp_path / "stages" / "fit.json",
        "data": tmp_path / "data",
        "model_summary": tmp_path / "model_summary.txt",
        "checkpoints": tmp_path / "checkpoints",
        "tensorboard": tmp_path / "tensorboard",
        "metrics": tmp_path / "metrics.json",
        "predictions": tmp_path / "predictions.npz",
        "report": tmp_path / "report.html",
        "export_version": tmp_path / "export" / "mnist" / "3",
        "log": tmp_path / "pipeline.log",
    }
    assert rundir.ARTIFACTS == (
        "run.json",
        "stages",
        "data",
        "checkpoints",
        "tensorboard",
        "metrics.json",
        "export",
        "model_summary.txt",
        "predictions.npz",
        "report.html",
    )
    assert RunDir.of(run) is run and RunDir.of(str(tmp_path)) == run
    assert str(run) == str(tmp_path)  # messages name the directory


def test_run_record(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(FileNotFoundError):
        run.read_run_record()
    rundir.check_identity(run, {"seed": 1}, {"seed": 1})
    assert run.read_run_record()["identity"] == {"seed": 1}
    durable.write_record(run.run_record, {"config": {}})
    with pytest.raises(durable.CorruptArtifact, match="no identity"):
        run.read_run_record()
    durable.write_record(run.run_record, ["not", "a", "record"])
    with pytest.raises(durable.CorruptArtifact):
        run.read_run_record()


def test_session_and_metrics(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_session() is None
    durable.write_record(run.session, {"state": "done"})
    assert run.read_session() == {"state": "done"}
    run.session.write_bytes(run.session.read_bytes()[:-3])
    damaged = run.session.read_bytes()
    assert run.read_session() is None and run.session.read_bytes() == damaged
    with pytest.raises(FileNotFoundError):
        run.read_metrics()
    run.metrics.write_text(json.dumps({"test_accuracy": 0.5}))
    assert run.read_metrics() == {"test_accuracy": 0.5}
    run.metrics.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        run.read_metrics()


def test_latest_checkpoint_meta_reads_without_setting_aside(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.latest_checkpoint_meta() is None
    for step in (3, 6):
        checkpoint.save(run.checkpoints, step, {"w": np.zeros(2)}, {"loop": {"global_step": step}})
    path, meta = run.latest_checkpoint_meta() or (None, {})
    assert path == checkpoint.path_for(run.checkpoints, 6) and meta["loop"]["global_step"] == 6
    (path / durable.MANIFEST).write_text("{}")
    assert run.latest_checkpoint_meta() == (path, {})
    assert checkpoint.committed_steps(run.checkpoints) == [3, 6]
    durable.set_aside(checkpoint.path_for(run.checkpoints, 3))
    assert [p.name for p in run.checkpoint_dirs()] == ["step-000000003.corrupt", "step-000000006"]


def test_export_listing(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.export_versions("mnist") == [] and run.export_dirs() == []
    for name in ("1", "2", "10", "2.corrupt", ".11.tmp-5"):
        (run.export_root("mnist") / name).mkdir(parents=True)
    (run.export_root("other") / "4").mkdir(parents=True)
    assert run.export_models() == ["mnist", "other"]
    assert run.export_versions("mnist") == [1, 2, 10]
    assert [str(p.relative_to(tmp_path)) for p in run.export_dirs()] == [
        "export/mnist/1",
        "export/mnist/2",
        "export/mnist/10",
        "export/mnist/2.corrupt",
        "export/other/4",
    ]


def test_prepared_data_is_verified_and_left_in_place(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no prepared data"):
        run.prepared_data()
    arrays = {"x_test": np.arange(8, dtype=np.uint8), "y_test": np.arange(2)}
    durable.write_dir(run.data, lambda tmp: np.savez(tmp / PREPARED, **arrays), {})
    got = run.prepared_data("x_test")
    assert list(got) == ["x_test"] and np.array_equal(got["x_test"], arrays["x_test"])
    assert sorted(run.prepared_data()) == ["x_test", "y_test"]
    path = run.data / PREPARED
    raw = bytearray(path.read_bytes())
    raw[-30] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(durable.CorruptArtifact):
        run.prepared_data()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # a reader sets nothing aside

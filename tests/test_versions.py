"""pipeline.versions: the library versions a run records (run.json, checkpoint manifests, the model
card), and what a later session under other versions does (a warning, or exit 2 when strict)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, cli, only_run_dir

from pipeline import __version__, checkpoint, durable, rundir, versions
from pipeline.errors import ConfigError

WARNING = "Versions differ from the run's first session"


def older_tensorflow() -> dict[str, str]:
    return {**versions.current(), "tensorflow": "2.20.0"}


def test_current_names_every_library_without_importing_tensorflow() -> None:
    now = versions.current()
    assert list(now) == ["python", "tensorflow", "keras", "numpy", "pipeline"]
    assert now["python"] == ".".join(map(str, sys.version_info[:3]))
    assert now["pipeline"] == __version__
    assert now["numpy"] == np.__version__
    assert all(isinstance(v, str) and v and v != versions.UNKNOWN for v in now.values())
    now["tensorflow"] = "changed"  # a copy: the caller cannot change what is recorded next
    assert versions.current()["tensorflow"] != "changed"


def test_current_does_not_import_tensorflow() -> None:
    code = (
        "import sys; from pipeline import versions; versions.current(); "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_differences() -> None:
    now = versions.current()
    assert versions.differences({"versions": now}) == []
    assert versions.differences({"versions": older_tensorflow()}) == [
        f"tensorflow 2.20.0 -> {now['tensorflow']}"
    ]
    then = {**now, "numpy": "1.26.4", "python": "3.10.0"}
    assert versions.differences({"versions": then, "other": 1}) == [
        f"python 3.10.0 -> {now['python']}",
        f"numpy 1.26.4 -> {now['numpy']}",
    ]
    # Written before versions were recorded: unknown, nothing to say.
    assert versions.differences({"identity": {}}) == []
    assert versions.differences({"versions": "garbage"}) == []
    assert versions.recorded({}) is None
    # A name only one side knows is left out; values are compared as text.
    assert versions.differences({"versions": {"keras": now["keras"], "jax": "0.4"}}) == []


def test_checkpoint_manifest_records_versions(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, 4, {"w": np.zeros(3)}, {"epoch": 0})
    manifest = durable.read_record(path / durable.MANIFEST)
    assert manifest["meta"]["versions"] == versions.current()
    loaded = checkpoint.load(path)
    assert loaded.versions == versions.current()
    assert loaded.meta == {"epoch": 0, "step": 4}  # the caller's meta, as before


def made_run(tmp_path: Path, recorded: dict[str, str] | None) -> rundir.RunDir:
    run = rundir.RunDir(tmp_path / "run")
    rundir.check_identity(run, {"seed": 1}, {"seed": 1, "run": {}})
    assert run.read_run_record()["versions"] == versions.current()
    record = run.read_run_record()
    if recorded is None:
        del record["versions"]
    else:
        record["versions"] = recorded
    durable.write_record(run.run_record, record)
    return run


def test_later_session_under_other_versions_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = made_run(tmp_path, older_tensorflow())
    with caplog.at_level(logging.DEBUG, logger="pipeline"):
        rundir.check_identity(run, {"seed": 1}, {"seed": 1, "run": {"strict_versions": False}})
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1 and lines[0].name.startswith("pipeline")
    changed = f"tensorflow 2.20.0 -> {versions.current()['tensorflow']}"
    assert lines[0].getMessage().startswith(f"{WARNING} ({changed}): ")
    # run.json keeps the first session's versions.
    assert run.read_run_record()["versions"] == older_tensorflow()


def test_strict_versions_refuses(tmp_path: Path) -> None:
    run = made_run(tmp_path, older_tensorflow())
    before = run.run_record.read_bytes()
    with pytest.raises(ConfigError) as refused:
        rundir.check_identity(run, {"seed": 1}, {"seed": 1, "run": {"strict_versions": True}})
    message = str(refused.value)
    assert "\n" not in message and refused.value.exit_code == 2
    assert "tensorflow 2.20.0 -> " in message and "run.strict_versions=true" in message
    assert "run.restart=true" in message and "run.name=<new name>" in message
    assert run.run_record.read_bytes() == before


def test_same_versions_or_none_recorded_say_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name, recorded in (("same", versions.current()), ("old", None)):
        run = made_run(tmp_path / name, recorded)
        with caplog.at_level(logging.DEBUG, logger="pipeline"):
            rundir.check_identity(run, {"seed": 1}, {"seed": 1, "run": {"strict_versions": True}})
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_session_record_has_this_sessions_versions(tmp_path: Path) -> None:
    run = rundir.RunDir(tmp_path)
    run.start_session("train")
    session = run.read_session()
    assert session is not None and session["versions"] == versions.current()


def checkpoint_files(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted((run_dir / "checkpoints").rglob("*"))
        if p.is_file()
    }


def test_run_records_versions_and_a_resume_under_others_warns_or_refuses(tmp_path: Path) -> None:
    # Restarts: a raised fit.epochs continues the run (the default's cosine is stretched over it).
    base = [*SMALL, "run.name=versions", "model=mlp", "fit.epochs=1", "optimizer=adam_restarts"]
    result = cli(["train", *base], tmp_path)
    assert result.returncode == 0, result.stderr
    assert WARNING not in result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    run = rundir.RunDir(run_dir)
    now = versions.current()
    record = run.read_run_record()
    assert record["versions"] == now
    newest = run.latest_checkpoint_meta()
    assert newest is not None and newest[1]["versions"] == now
    (card_path,) = run_dir.glob("export/*/*/model_card.json")
    assert json.loads(card_path.read_text())["versions"] == now

    # The run's first session was under an older TensorFlow.
    durable.write_record(run.run_record, {**record, "versions": older_tensorflow()})
    expected = f"tensorflow 2.20.0 -> {now['tensorflow']}"

    # Strict: refused before anything is touched.
    before = {**checkpoint_files(run_dir), "run.json": run.run_record.read_bytes()}
    before["session.json"] = run.session.read_bytes()
    result = cli(["train", *base, "fit.epochs=2", "run.strict_versions=true"], tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "run.strict_versions=true" in errors[0]
    assert "Traceback" not in result.stderr
    after = {**checkpoint_files(run_dir), "run.json": run.run_record.read_bytes()}
    after["session.json"] = run.session.read_bytes()
    assert after == before

    # Default: one line says so, and the run continues from its checkpoint.
    result = cli(["train", *base, "fit.epochs=2"], tmp_path)
    assert result.returncode == 0, result.stderr
    output = (result.stdout + result.stderr).splitlines()
    warned = [line for line in output if WARNING in line]
    assert warned == [
        f"{WARNING} ({expected}): the run continues, but not bit-identical to an "
        "uninterrupted run. run.strict_versions=true refuses instead."
    ], result.stdout
    assert "Fit: resuming from step-000000010" in result.stdout
    assert run.read_run_record()["versions"] == older_tensorflow()  # the first session's
    newest = run.latest_checkpoint_meta()
    assert newest is not None and newest[1]["versions"] == now
    assert newest[0].name == "step-000000020"
    session = run.read_session()
    assert session is not None and session["versions"] == now

"""Nothing a user types writes, renames or deletes anything outside `run.outputs/<run name>/`.

A sentinel tree (a user's own `data/`, `checkpoints/`, `stages/`, `export/`, a file, a symlink
into them) surrounds `outputs/`; hostile values of run.name, run.outputs, export.model_name,
data.path and evaluate.checkpoint, with and without run.restart=true, each end in one `error:`
line and a non-zero exit, and the tree stays byte-for-byte the same.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import cli

from pipeline import durable, rundir
from pipeline.errors import PipelineError

SMALL_DATA = ["data=sample", "data.train_size=200", "data.test_size=100"]

HOSTILE = [
    ["run.name=.."],
    ["run.name=..", "run.restart=true"],
    ["run.name=.", "run.restart=true"],
    ["run.name=../data", "run.restart=true"],
    ["run.name=a/b"],
    ["run.name=/tmp/pipeline-hostile", "run.restart=true"],
    ["run.name=.hidden"],
    ["run.name=a\x1b[2Jb"],
    ["run.name=" + "x" * 300],
    ["run.outputs=.", "run.name=data", "run.restart=true"],
    ["run.outputs=..", "run.name=user", "run.restart=true"],
    ["run.name=link", "run.restart=true"],  # outputs/link -> ../data
    ["run.outputs=notes.txt"],
    ["export.model_name=.."],
    ["export.model_name=../../../data", "run.restart=true"],
    ["export.model_name=/tmp/pipeline-hostile"],
    ["export.model_name=.x"],
    ["evaluate.checkpoint=../../data"],
    ["evaluate.checkpoint=-1", "run.restart=true"],
    ["data=mnist", "data.path=notes.txt", "run.name=p1"],
    ["data=mnist", "data.path=../data", "run.name=p2", "run.restart=true"],
    ["data=mnist", "data.path=/nonexistent/mnist.npz", "run.name=p3"],
]


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under `root` except `skip`: kind, mode, and bytes or link target."""
    seen: dict[str, tuple] = {}
    for top, dirs, files in os.walk(root):
        if Path(top) == skip:
            dirs[:] = []
            continue
        for name in sorted(dirs + files):
            path = Path(top) / name
            if path == skip:
                continue
            mode = path.lstat().st_mode
            if path.is_symlink():
                seen[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                seen[str(path)] = ("dir", mode)
            else:
                seen[str(path)] = ("file", mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """tmp/home/user: the user's own folders beside outputs/, a sibling user's folder."""
    user = tmp_path / "home" / "user"
    for folder in ("data", "checkpoints/step-000000001", "stages", "export/mnist/1", "tensorboard"):
        (user / folder).mkdir(parents=True)
        (user / folder / "precious.txt").write_text(f"the user's own {folder}\n")
    (user / "data" / "checkpoints").mkdir()  # user/data looks like a run's checkpoints too
    (user / "data" / "metrics.json").write_text("{}\n")
    (user / "notes.txt").write_text("not a directory\n")
    (tmp_path / "home" / "other").mkdir()
    (tmp_path / "home" / "other" / "thesis.tex").write_text("\\begin{document}\n")
    (user / "outputs").mkdir()
    (user / "outputs" / "link").symlink_to(user / "data")
    return user


def test_hostile_values_change_nothing_outside_the_run(world: Path) -> None:
    home = world.parent
    before = snapshot(home, skip=world / "outputs")
    for args in HOSTILE:
        result = cli(["data", *SMALL_DATA, *args], world)
        lines = result.stderr.strip().splitlines()
        errors = [x for x in lines if x.startswith("error: ")]
        assert result.returncode != 0, (args, result.stderr)
        assert len(errors) == 1 and "Traceback" not in result.stderr, (args, result.stderr)
    assert snapshot(home, skip=world / "outputs") == before
    assert not Path("/tmp/pipeline-hostile").exists()


def test_restart_removes_symlinks_without_following_them(world: Path) -> None:
    """A run of ours whose artifacts were replaced by symlinks into the user's folders:
    run.restart=true removes the links, never what they point at."""
    home = world.parent
    args = ["data", *SMALL_DATA, "run.name=r"]
    assert cli(args, world).returncode == 0
    run = world / "outputs" / "r"
    (run / "export").symlink_to(world / "export")
    (run / "stages" / "evil").symlink_to(world / "checkpoints")
    (run / "metrics.json").symlink_to(world / "data" / "metrics.json")
    before = snapshot(home, skip=world / "outputs")
    result = cli([*args, "run.restart=true"], world)
    assert result.returncode == 0, result.stderr
    assert snapshot(home, skip=world / "outputs") == before
    assert not (run / "export").exists() and not (run / "metrics.json").exists()


def test_restart_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "mine.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="is not a run directory of this pipeline"):
        rundir.restart(tmp_path)
    (tmp_path / "run.json").write_text('{"some": "other tool"}')
    with pytest.raises(PipelineError):
        rundir.restart(tmp_path)
    assert (tmp_path / "checkpoints" / "mine.txt").read_text() == "keep me"


def test_restart_deletes_a_run_whose_record_is_damaged(tmp_path: Path) -> None:
    """A damaged run.json of ours is what run.restart=true is for."""
    rundir.check_identity(tmp_path, {"seed": 1}, {})
    (tmp_path / "checkpoints").mkdir()
    record = tmp_path / "run.json"
    record.write_text(record.read_text().replace('"seed": 1', '"seed": 2'))
    with pytest.raises(durable.CorruptArtifact):
        durable.read_record(record)
    rundir.restart(tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not record.exists()

"""What a user sees: TensorFlow's C++ start-up notes stay off the terminal (kept in the log)."""

from __future__ import annotations

from pathlib import Path

from conftest import cli, only_run_dir

from pipeline.rundir import RunDir
from pipeline.tfstart import CHATTER

NOTES = ("absl::InitializeLog", "oneDNN custom operations", "cuda drivers", "cuInit", "XNNPACK")


def test_tensorflow_start_up_notes_stay_off_the_terminal(tmp_path: Path) -> None:
    args = ["train", "data=sample", "data.train_size=300", "data.test_size=100", "model=mlp"]
    # TensorFlow's own level 0 (print everything): the notes come anyway, before it applies.
    result = cli([*args, "fit.epochs=1"], tmp_path, env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert result.returncode == 0, result.stderr
    shown = result.stdout + result.stderr
    assert not [note for note in NOTES if note in shown], shown
    log = RunDir(only_run_dir(tmp_path / "outputs")).log.read_text()
    assert "TensorFlow start-up: " in log and "oneDNN custom operations" in log
    # Only the known notes are dropped: anything else TensorFlow prints still shows.
    assert not CHATTER.search("error: could not load libcudnn.so.9: no such file")

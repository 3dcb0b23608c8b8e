"""What a user sees: TensorFlow's C++ start-up notes stay off the terminal (kept in the log);
progress that suits where the output goes (a terminal, or a file)."""

from __future__ import annotations

import re
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


TINY = [
    "data=sample",
    "data.train_size=600",
    "data.test_size=200",
    "model=mlp",
    "fit.batch_size=54",
]
ANSI = re.compile(r"\x1b\[|[\r\b]")


def test_a_log_captured_to_a_file_is_plain_lines(tmp_path: Path) -> None:
    """fit.progress=auto with stdout a file (Slurm, CI, tee): plain lines every
    fit.log_every_steps steps, no control codes, no line over 300 characters, each fact once."""
    result = cli(["train", *TINY, "fit.epochs=2", "fit.log_every_steps=3"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert not ANSI.search(out), out
    assert max(len(line) for line in out.splitlines()) <= 300
    lines = re.findall(
        r"^Epoch (\d)/2 step (\d+)/10: loss [\d.]+, accuracy [\d.]+, [\d.]+ steps/s, "
        r"ETA epoch \d+:\d\d, run \d+:\d\d$",
        out,
        flags=re.M,
    )
    # Steps 3, 6, 9 of epoch 1 and 12, 15, 18 (2, 5, 8 of epoch 2); the epoch's last step is
    # said by its summary line.
    assert [(int(e), int(s)) for e, s in lines] == [(1, 3), (1, 6), (1, 9), (2, 2), (2, 5), (2, 8)]
    assert len(re.findall(r"^Epoch 1: loss=", out, flags=re.M)) == 1
    # The test accuracy once (the tutorial's words), not twice in two wordings.
    assert len(re.findall(r"accuracy: \d+\.\d\d%", out)) == 1, out
    assert "test accuracy" not in out
    # The file log holds the same lines (with timestamps), no control codes either.
    log = RunDir(only_run_dir(tmp_path / "outputs")).log.read_text()
    assert "Epoch 2/2 step 8/10: loss" in log and not ANSI.search(log)


def test_progress_modes(tmp_path: Path) -> None:
    """bar forces Keras' live bar even into a file (the control codes the default keeps off
    files: this is what the test above would see without auto); off prints epoch lines only."""
    for name in ("bar", "off", "bad"):
        (tmp_path / name).mkdir()
    bar = cli(["train", *TINY, "fit.epochs=1", "fit.progress=bar"], tmp_path / "bar")
    assert bar.returncode == 0, bar.stderr
    assert ANSI.search(bar.stdout) and "Epoch 1/1\n" in bar.stdout
    off = cli(["train", *TINY, "fit.epochs=1", "fit.progress=off"], tmp_path / "off")
    assert off.returncode == 0, off.stderr
    assert not re.search(r"step \d+/\d+", off.stdout) and "Epoch 1: loss=" in off.stdout
    bad = cli(["train", *TINY, "fit.progress=fancy"], tmp_path / "bad")
    assert bad.returncode == 2 and "fit.progress" in bad.stderr and "line" in bad.stderr


def test_auto_shows_the_bar_on_a_terminal(tmp_path: Path) -> None:
    """stdout a terminal (a pseudo-terminal here): auto chooses Keras' live bar."""
    import os
    import pty
    import subprocess
    import sys

    (tmp_path / "t").mkdir()
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", *TINY, "fit.epochs=1"],
        cwd=tmp_path / "t",
        stdout=follower,
        stderr=subprocess.PIPE,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process has ended
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    os.close(leader)
    text = shown.decode(errors="replace")
    assert "Epoch 1/1" in text and "\r" in text and "steps/s, ETA" not in text

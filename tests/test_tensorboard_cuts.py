"""TensorBoard event files across power cuts and resumes (pipeline.tblog). Reading event
files makes TensorBoard import TensorFlow (seconds), so these are apart from the fast
durable-primitive tests of test_power_cut.py. Needs fuse3 and mfusepy (fails, never skips)."""

from __future__ import annotations

from pathlib import Path

from conftest import faultfs
from test_power_cut import read_events


def test_resuming_twice_from_one_checkpoint_marks_the_resume_once(fs: faultfs.FaultFS) -> None:
    """A session resumes from step 8 and dies (power cut) before its next checkpoint reaches
    the disk; the next one resumes from step 8 again. Found by crash_test.py --power-cut:
    TensorBoard showed resume/step twice at step 8."""
    from pipeline import tblog

    logdir = fs.mount / "run" / "tensorboard"
    first = tblog.EventLog(logdir)
    for step in range(1, 9):
        first.scalar("train/loss", 1.0 / step, step)
    first.close()
    fs.sync()
    for _ in range(2):  # two sessions resume from checkpoint 8, as fit does
        tblog.truncate_after(logdir, 8)
        session = tblog.EventLog(logdir)
        session.session_start(9)
        session.scalar(tblog.RESUME_TAG, 8, 8)
        session.scalar("train/loss", 0.5, 9)
        session.sync()  # the cut below drops the checkpoint of step 12, not these events
        session._file.close()
        fs.cut()
    markers = [
        e.step
        for path in tblog.event_files(logdir)
        for e in read_events(path)
        if any(v.tag == tblog.RESUME_TAG for v in e.summary.value)
    ]
    assert markers == [8]


def test_resume_cuts_a_torn_last_record_even_when_no_step_is_dropped(tmp_path: Path) -> None:
    """A real disk can keep part of the last, un-fsynced record (faultfs cannot tear one): the
    resume rewrites the file without it, although no complete record is after the checkpoint."""
    from pipeline import tblog

    events = tblog.EventLog(tmp_path)
    for step in range(1, 5):
        events.scalar("train/loss", 1.0 / step, step)
    events.close()
    good = events.path.read_bytes()
    events.path.write_bytes(good + good[-30:-10])  # the first bytes of one more record
    assert tblog.truncate_after(tmp_path, 4) == 0
    assert events.path.read_bytes() == good
    assert tblog.truncate_after(tmp_path, 4) == 0  # nothing torn any more: left alone

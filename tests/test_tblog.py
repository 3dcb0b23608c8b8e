"""pipeline.tblog: event files read back with TensorBoard's own loaders.

Reading event files makes TensorBoard import TensorFlow (through tensorboard.compat), which
costs a couple of seconds once per session; the pipeline code itself does not need it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import (
    EventFileLoader,
    RawEventFileLoader,
)
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from pipeline import durable, tblog

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def scalars(logdir: Path, tag: str, purge: bool = False) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard shows it. With purge=False TensorBoard keeps
    duplicate and out-of-order steps, so the files themselves must be right."""
    acc = EventAccumulator(str(logdir), purge_orphaned_data=purge)
    acc.Reload()
    return [(event.step, round(event.value, 4)) for event in acc.Scalars(tag)]


def raw_events(path: Path) -> list:
    return list(EventFileLoader(str(path)).Load())


def session(
    logdir: Path, steps: range, offset: float = 0.0, start: int | None = None, close: bool = True
) -> tblog.EventLog:
    log = tblog.EventLog(logdir)
    if start is not None:
        log.session_start(start)
    for step in steps:
        log.scalar("train/loss", offset + step / 100, step)
        if step % 2 == 0:
            log.scalar("val/accuracy", offset + step / 10, step)
    if close:
        log.close()
    else:
        log.sync()
    return log


def test_steps_written_once_each(tmp_path: Path) -> None:
    log = session(tmp_path, range(1, 6))
    assert tblog.event_files(tmp_path) == [log.path]
    assert log.path.name.startswith("events.out.tfevents.")
    assert log.path.name.endswith(f".{os.getpid()}")
    assert scalars(tmp_path, "train/loss") == [(s, s / 100) for s in range(1, 6)]
    assert scalars(tmp_path, "val/accuracy") == [(2, 0.2), (4, 0.4)]
    events = raw_events(log.path)
    assert events[0].file_version == "brain.Event:2" and events[0].step == 0
    assert [e.step for e in events[1:]] == [1, 2, 2, 3, 4, 4, 5]


def test_sync_makes_events_readable_before_close(tmp_path: Path) -> None:
    log = session(tmp_path, range(1, 4), close=False)
    try:
        assert scalars(tmp_path, "train/loss") == [(1, 0.01), (2, 0.02), (3, 0.03)]
    finally:
        log.close()
    log.close()  # closing twice is harmless


def test_truncate_after_drops_later_steps(tmp_path: Path) -> None:
    log = session(tmp_path, range(1, 11))
    # Steps 7..10: 4 losses and 2 accuracies (8, 10).
    assert tblog.truncate_after(tmp_path, 6) == 6
    assert [e.step for e in raw_events(log.path)] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6]
    assert scalars(tmp_path, "train/loss") == [(s, s / 100) for s in range(1, 7)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [log.path.name]  # no temp left


def test_truncate_after_keeps_records_byte_for_byte(tmp_path: Path) -> None:
    log = session(tmp_path, range(1, 9))
    original = log.path.read_bytes()
    kept_records = [
        r for r in RawEventFileLoader(str(log.path)).Load() if Event.FromString(r).step <= 4
    ]
    tblog.truncate_after(tmp_path, 4)
    truncated = log.path.read_bytes()
    assert len(truncated) < len(original)
    assert truncated == original[: len(truncated)]  # an exact prefix of the original
    assert list(RawEventFileLoader(str(log.path)).Load()) == kept_records
    # Scalars stay in their written form (simple_value), not migrated to tensors.
    events = [Event.FromString(r) for r in kept_records]
    values = [v for e in events for v in e.summary.value]
    assert [v.WhichOneof("value") for v in values] == ["simple_value"] * len(values)
    assert [v.simple_value for v in values if v.tag == "train/loss"] == pytest.approx(
        [0.01, 0.02, 0.03, 0.04]
    )


def test_truncate_after_without_later_steps_leaves_file_alone(tmp_path: Path) -> None:
    log = session(tmp_path, range(1, 5))
    before = log.path.stat()
    assert tblog.truncate_after(tmp_path, 4) == 0
    (tmp_path / "empty").mkdir()
    assert tblog.truncate_after(tmp_path / "empty", 4) == 0
    after = log.path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def test_resume_after_crash_shows_each_step_once(tmp_path: Path) -> None:
    # Session 1 logged up to step 10, but its last checkpoint covers step 6 (then it was killed).
    first = session(tmp_path, range(1, 11), close=False)
    first._file.close()  # killed: no close() bookkeeping
    assert tblog.truncate_after(tmp_path, 6) == 6
    # Session 2 resumes from the step-6 checkpoint and logs 7..12 with different values.
    second = session(tmp_path, range(7, 13), offset=1.0, start=7)
    assert tblog.event_files(tmp_path) == sorted([first.path, second.path])
    assert second.path.name > first.path.name  # TensorBoard reads files in name order

    expected = [(s, s / 100) for s in range(1, 7)] + [(s, 1 + s / 100) for s in range(7, 13)]
    for purge in (False, True):
        loss = scalars(tmp_path, "train/loss", purge=purge)
        assert loss == expected
        steps = [step for step, _ in loss]
        assert steps == sorted(set(steps))  # each step once, increasing
    assert scalars(tmp_path, "val/accuracy") == [
        (2, 0.2),
        (4, 0.4),
        (6, 0.6),
        (8, 1.8),
        (10, 2.0),
        (12, 2.2),
    ]
    starts = [e.step for e in raw_events(second.path) if e.HasField("session_log")]
    assert starts == [7]
    assert raw_events(second.path)[1].session_log.status == SessionLog.START


def test_without_truncation_tensorboard_would_show_duplicates(tmp_path: Path) -> None:
    """The control for the test above: skipping truncate_after is visible to the reader."""
    session(tmp_path, range(1, 11))
    session(tmp_path, range(7, 13), offset=1.0, start=7)
    steps = [step for step, _ in scalars(tmp_path, "train/loss")]
    assert steps != sorted(set(steps))


def test_truncate_after_rewrites_every_file(tmp_path: Path) -> None:
    session(tmp_path, range(1, 5))
    session(tmp_path, range(5, 9), start=5)
    # (3, 4, 4) from the first file; the session start at 5 and (5, 6, 6, 7, 8, 8) from the second
    assert tblog.truncate_after(tmp_path, 2) == 3 + 7
    assert scalars(tmp_path, "train/loss") == [(1, 0.01), (2, 0.02)]
    assert len(tblog.event_files(tmp_path)) == 2


def test_truncate_after_cuts_a_torn_last_record(tmp_path: Path) -> None:
    log = session(tmp_path, range(1, 9))
    raw = log.path.read_bytes()
    # A kill in the middle of writing one more record: half of a copy of the last one.
    log.path.write_bytes(raw + raw[-40:-20])
    assert tblog.truncate_after(tmp_path, 5) == 5  # 6, 6, 7, 8, 8
    steps = [e.step for e in raw_events(log.path)]
    assert steps == [0, 1, 2, 2, 3, 4, 4, 5]
    resumed = session(tmp_path, range(6, 9), offset=1.0, start=6)
    assert scalars(tmp_path, "train/loss") == [(s, s / 100) for s in range(1, 6)] + [
        (s, 1 + s / 100) for s in range(6, 9)
    ]
    assert durable.TMP_MARK not in "".join(p.name for p in tmp_path.iterdir())
    assert resumed.path in tblog.event_files(tmp_path)


@pytest.mark.parametrize(
    "name", [".events.out.tfevents.1.host.tmp-5.1", "events.out.tfevents.1.host.tmp-5.1"]
)
def test_event_files_ignore_temporaries(tmp_path: Path, name: str) -> None:
    log = session(tmp_path, range(1, 2))
    (tmp_path / name).write_bytes(b"")
    assert tblog.event_files(tmp_path) == [log.path]

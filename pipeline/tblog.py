"""TensorBoard event files that stay correct across crashes and resumes.

Events are written with TensorBoard's own record format. `sync` flushes and fsyncs the file; fit
calls it before committing a checkpoint, so every step a checkpoint covers is on disk. On resume
from step S, events after S (written by the killed process after its last checkpoint) are cut
from the old files before training continues, so every reader sees each step exactly once.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

from pipeline import durable

PREFIX = "events.out.tfevents."


def event_files(logdir: Path) -> list[Path]:
    return sorted(p for p in logdir.glob(PREFIX + "*") if durable.TMP_MARK not in p.name)


def last_step(logdir: Path) -> int:
    """The highest step any event file records (0 if none)."""
    steps = [
        Event.FromString(r).step
        for path in event_files(logdir)
        for r in RawEventFileLoader(str(path)).Load()
    ]
    return max(steps, default=0)


def truncate_after(logdir: Path, step: int) -> int:
    """Drop events with a step greater than `step` from every event file; return how many."""
    dropped = 0
    for path in event_files(logdir):
        # Raw records, rewritten byte for byte: the non-raw loader would upgrade them to
        # another summary format on the way.
        records = list(RawEventFileLoader(str(path)).Load())
        keep = [r for r in records if Event.FromString(r).step <= step]
        if len(keep) == len(records):
            continue
        dropped += len(records) - len(keep)
        durable.write_file(path, functools.partial(_write_records, records=keep))
    return dropped


# --- added for run visuals (evaluate-time images, hparams, graph) --------------------------------
def drop_events(logdir: Path, should_drop: Callable[[Event], bool]) -> int:
    """Drop the events `should_drop` selects from every event file; return how many. Evaluate
    uses it to replace what an earlier evaluation wrote (same step, hparams, graph), so running
    it again never leaves duplicates. Files are rewritten atomically, like truncate_after."""
    dropped = 0
    for path in event_files(logdir):
        records = list(RawEventFileLoader(str(path)).Load())
        keep = [r for r in records if not should_drop(Event.FromString(r))]
        if len(keep) == len(records):
            continue
        dropped += len(records) - len(keep)
        durable.write_file(path, functools.partial(_write_records, records=keep))
    return dropped


# --- end of additions for run visuals ---------------------------------------------------------


def _write_records(path: Path, records: list[bytes]) -> None:
    with open(path, "wb") as handle:
        writer = RecordWriter(handle)
        for record in records:
            writer.write(record)
        writer.flush()


class EventLog:
    """An append-only event file for one process (one session of a run)."""

    def __init__(self, logdir: Path) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / name
        self._file = open(self.path, "ab")
        self._writer = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))

    def _write(self, event: Event) -> None:
        self._writer.write(event.SerializeToString())

    def scalar(self, tag: str, value: float, step: int) -> None:
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def session_start(self, step: int) -> None:
        """Mark where this session starts (TensorBoard shows restarts from these)."""
        self._write(
            Event(wall_time=time.time(), step=step, session_log=SessionLog(status=SessionLog.START))
        )

    # --- added for run visuals (evaluate-time images, hparams, graph) ----------------------------
    def image(
        self, tag: str, png_bytes: bytes, step: int, width: int, height: int, colorspace: int = 3
    ) -> None:
        """A PNG as an image summary (colorspace 1 gray, 3 RGB, 4 RGBA)."""
        image = Summary.Image(
            height=height, width=width, colorspace=colorspace, encoded_image_string=png_bytes
        )
        self._write(
            Event(
                wall_time=time.time(),
                step=step,
                summary=Summary(value=[Summary.Value(tag=tag, image=image)]),
            )
        )

    def hparams(
        self,
        values: dict[str, Any],
        group_name: str,
        start_time: float | None = None,
        step: int = 0,
    ) -> None:
        """The HParams plugin's session start (these hyperparameter values) and end (success)
        for this run, so `tensorboard --logdir outputs` lists a sweep in one table. Values:
        bool, int, float or str. The metrics are this run's scalar tags."""
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        start = hparams_pb(values, trial_id=group_name, start_time_secs=start_time)
        self._write(Event(wall_time=time.time(), step=step, summary=start))
        end = plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(
                status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time()
            )
        )
        value = Summary.Value(
            tag=metadata.SESSION_END_INFO_TAG,
            tensor=metadata.NULL_TENSOR,
            metadata=metadata.create_summary_metadata(end),
        )
        self._write(Event(wall_time=time.time(), step=step, summary=Summary(value=[value])))

    def graph(self, graph_def: bytes, step: int = 0) -> None:
        """A serialized GraphDef, for TensorBoard's Graphs dashboard."""
        self._write(Event(wall_time=time.time(), step=step, graph_def=graph_def))

    # --- end of additions for run visuals ---------------------------------------------------

    def flush(self) -> None:
        """Hand buffered events to the OS: they survive a killed process (not a power loss)."""
        self._writer.flush()

    def sync(self) -> None:
        self._writer.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

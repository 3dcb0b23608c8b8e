"""TensorBoard event files that stay correct across crashes and resumes, in Keras' layout.

A run's `tensorboard/` holds the runs Keras' TensorBoard callback writes: `train/` and
`validation/`, whose shared tags (`epoch_loss`, `epoch_accuracy`) TensorBoard draws in one
chart, with `batch_*` tags under `train/`; the top directory holds the evaluation (test metrics,
images, graph) and the HParams session, so `tensorboard --logdir outputs` lists every run of a
sweep in the HParams table with its state (running from fit's start, then success or failure).

Events are written with TensorBoard's own record format. `sync` flushes and fsyncs the file; fit
calls it before committing a checkpoint, so every step a checkpoint covers is on disk. On resume
from step S, events after S (written by the killed process after its last checkpoint) are cut
from the old files before training continues, so every reader sees each step exactly once.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.summary.writer.record_writer import RecordWriter

from pipeline import durable

PREFIX = "events.out.tfevents."
TRAIN, VALIDATION = "train", "validation"  # Keras' run names
RESUME_TAG = "resume/step"  # the scalar fit writes (under train/) at the step a session resumes
HPARAMS_TAGS = frozenset({"_hparams_/session_start_info", "_hparams_/session_end_info"})


def event_files(logdir: Path) -> list[Path]:
    """Every event file under `logdir`, its runs' subdirectories included."""
    return sorted(p for p in logdir.rglob(PREFIX + "*") if durable.TMP_MARK not in p.name)


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under `logdir` as TensorBoard's own loader reads it, keyed "<run>/<tag>"
    ("train/epoch_loss"; the top directory's tags as they are): [(step, value)]."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"scalars": 0})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    found = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            found[_key(run, tag)] = [(e.step, e.value) for e in mux.Scalars(run, tag)]
    return found


def scalar_key(logdir: Path, path: Path, tag: str) -> str:
    """The key `scalars` gives a tag of the event file `path`."""
    return _key(path.parent.relative_to(logdir).as_posix(), tag)


def _key(run: str, tag: str) -> str:
    return tag if run == "." else f"{run}/{tag}"


def records(path: Path) -> list[bytes]:
    """The records of one event file (TFRecord framing: length, its CRC, data, its CRC), each
    checked against both CRCs. Reading stops at the first torn or damaged record, as
    TensorBoard's loader does. Plain Python, so the report reads runs without TensorFlow; the
    one reader for the report and for resume."""
    with durable.naming(path):
        data = path.read_bytes()
    found, pos = [], 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack_from("<I", data, pos + 8)
        start, end = pos + 12, pos + 12 + length
        if masked_crc32c(header) != header_crc or end + 4 > len(data):
            break
        body = data[start:end]
        (body_crc,) = struct.unpack_from("<I", data, end)
        if masked_crc32c(body) != body_crc:
            break
        found.append(body)
        pos = end + 4
    return found


def events(path: Path) -> list[Event]:
    return [Event.FromString(r) for r in records(path)]


def last_step(logdir: Path) -> int:
    """The highest step any event file records (0 if none)."""
    steps = [Event.FromString(r).step for path in event_files(logdir) for r in records(path)]
    return max(steps, default=0)


def truncate_after(logdir: Path, step: int) -> int:
    """Drop events with a step greater than `step` from every event file; return how many.

    Also dropped: the `resume/step` marker at `step` itself. Only a session that resumed from
    this very checkpoint wrote one, and its work is being discarded (it died before its next
    checkpoint reached the disk); the session resuming now writes its own, so TensorBoard
    shows that resume once."""
    dropped = 0
    for path in event_files(logdir):
        # Raw records, rewritten byte for byte: the non-raw loader would upgrade them to
        # another summary format on the way.
        old = records(path)
        keep = [r for r in old if not _after(Event.FromString(r), step)]
        # A record frame is 8 bytes of length, 4 of its CRC, the data, 4 of the data's CRC.
        torn = sum(len(r) + 16 for r in old) != path.stat().st_size
        if len(keep) == len(old) and not torn:
            continue
        dropped += len(old) - len(keep)
        durable.write_file(path, functools.partial(_write_records, records=keep))
    return dropped


def _after(event: Event, step: int) -> bool:
    if event.step > step:
        return True
    return event.step == step and any(v.tag == RESUME_TAG for v in event.summary.value)


# --- added for run visuals (evaluate-time images, hparams, graph) --------------------------------
def drop_events(logdir: Path, should_drop: Callable[[Event], bool]) -> int:
    """Drop the events `should_drop` selects from every event file; return how many. Evaluate
    uses it to replace what an earlier evaluation wrote (same step, hparams, graph), so running
    it again never leaves duplicates. Files are rewritten atomically, like truncate_after."""
    dropped = 0
    for path in event_files(logdir):
        old = records(path)
        keep = [r for r in old if not should_drop(Event.FromString(r))]
        if len(keep) == len(old):
            continue
        dropped += len(old) - len(keep)
        durable.write_file(path, functools.partial(_write_records, records=keep))
        if all(Event.FromString(r).WhichOneof("what") == "file_version" for r in keep):
            # Nothing but its header left (fit's "running" HParams once evaluate replaced
            # them): removed, after the rewrite, so a lost removal leaves only that header.
            path.unlink()
            durable.fsync_dir(path.parent)
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
        durable.make_dirs(logdir)
        name = f"{PREFIX}{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / name
        self._file = open(self.path, "ab")
        self._writer = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))
        # The new file's name must be on disk for `sync` to mean anything after a power cut
        # (fsync of a file does not persist its directory entry); so must the directory's own
        # (it may come from a plain mkdir).
        self.sync()
        durable.fsync_dir(logdir)
        durable.fsync_dir(logdir.parent)

    def _write(self, event: Event) -> None:
        with durable.naming(self.path):  # a failed write names this event file
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
        status: str = "success",
    ) -> None:
        """The HParams plugin's session start (these hyperparameter values) and its state
        ("running", "success" or "failure"; the plugin reads it from the session-end record,
        which for "running" has no end time), so `tensorboard --logdir outputs` lists a sweep
        in one table with each run's state. Values: bool, int, float or str. The metrics are
        the scalar tags of this run's directories (train/, validation/, its own)."""
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        start = hparams_pb(values, trial_id=group_name, start_time_secs=start_time)
        self._write(Event(wall_time=time.time(), step=step, summary=start))
        codes = {
            "running": api_pb2.STATUS_RUNNING,
            "success": api_pb2.STATUS_SUCCESS,
            "failure": api_pb2.STATUS_FAILURE,
        }
        end_info = plugin_data_pb2.SessionEndInfo(status=codes[status])
        if status != "running":
            end_info.end_time_secs = time.time()
        end = plugin_data_pb2.HParamsPluginData(session_end_info=end_info)
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
        with durable.naming(self.path):
            self._writer.flush()

    def sync(self) -> None:
        with durable.naming(self.path):
            self._writer.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.sync()
            finally:
                with durable.naming(self.path):
                    self._file.close()


def write_hparams(
    logdir: Path,
    values: dict[str, Any],
    group_name: str,
    start_time: float | None,
    status: str,
) -> None:
    """Replace the run's HParams session (an earlier one would be the one TensorBoard keeps)
    with these values and `status`: "running", "success" or "failure"."""
    drop_events(logdir, lambda e: any(v.tag in HPARAMS_TAGS for v in e.summary.value))
    events = EventLog(logdir)
    try:
        events.hparams(values, group_name, start_time, status=status)
    finally:
        events.close()


class Runs:
    """One session's event files in Keras' layout: an EventLog per run directory (`train/`,
    `validation/`), each created on its first event, starting with the session's start marker
    when the session resumes."""

    def __init__(self, logdir: Path, resumed_at: int | None = None) -> None:
        self.logdir, self.resumed_at = logdir, resumed_at
        self.logs: dict[str, EventLog] = {}

    def __getitem__(self, run: str) -> EventLog:
        if run not in self.logs:
            log = EventLog(self.logdir / run)
            if self.resumed_at is not None:
                log.session_start(self.resumed_at)
            self.logs[run] = log
        return self.logs[run]

    def scalar(self, run: str, tag: str, value: float, step: int) -> None:
        self[run].scalar(tag, value, step)

    def flush(self) -> None:
        for log in self.logs.values():
            log.flush()

    def sync(self) -> None:
        for log in self.logs.values():
            log.sync()

    def close(self) -> None:
        for log in self.logs.values():
            log.close()

"""Is a run exactly what an uninterrupted run of the same config gives? The one check behind the
promise "interrupted or not, same bits", used by the crash harness and by the tests.

It compares, between a reference run directory and a run directory:
- every array of every checkpoint both still hold (the newest must be the same step), each read
  through the verified loader; the kept checkpoints include mid-epoch ones, whose metric
  accumulators are not yet zeroed, so a wrong restore of them shows;
- each checkpoint's loop state (history, best step and value, patience counter, stopped-early
  flag, position), without the fields that are wall-clock facts (`WALL_CLOCK_LOOP_KEYS`);
- every TensorBoard scalar's (step, value) pairs as TensorBoard's own loader reads them, each
  step seen once, except tags that measure wall-clock time or mark resumes (`WALL_CLOCK_TAGS`);
- the test metrics (`metrics.json`);
- the probabilities of the newest exported SavedModel on the run's own test images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import checkpoint, durable
from pipeline.rundir import RunDir

# Loop-state fields that record when and how often a run was interrupted, not what it computed.
WALL_CLOCK_LOOP_KEYS = frozenset({"train_seconds", "resumes", "time"})
# Checkpoint meta fields written from the clock.
WALL_CLOCK_META_KEYS = frozenset({"time"})
# Scalars that measure speed or mark a resume: different by nature in an interrupted run.
WALL_CLOCK_TAGS = frozenset({"train/epoch_steps_per_second", "train/resume/step"})
PREDICTION_IMAGES = 200


@dataclass
class Comparison:
    """What was compared and every difference found (empty: the runs are identical)."""

    differences: list[str] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)  # steps compared
    mid_epoch_checkpoints: int = 0  # of those, how many had live metric accumulators
    arrays: int = 0
    scalar_tags: int = 0
    scalar_values: int = 0
    predictions: int = 0

    @property
    def identical(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        return (
            f"{len(self.checkpoints)} checkpoints ({self.mid_epoch_checkpoints} mid-epoch), "
            f"{self.arrays} arrays, {self.scalar_values} values of {self.scalar_tags} "
            f"TensorBoard scalars, test metrics, {self.predictions} exported predictions"
        )


def compare_runs(
    reference: RunDir | Path, run: RunDir | Path, predictions: bool = True
) -> Comparison:
    reference, run = RunDir.of(reference), RunDir.of(run)
    result = Comparison()
    _compare_checkpoints(reference, run, result)
    _compare_scalars(reference, run, result)
    _compare_metrics(reference, run, result)
    if predictions:
        _compare_predictions(reference, run, result)
    return result


def loop_state(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's loop state without its wall-clock fields (also inside history rows)."""
    loop = {k: v for k, v in meta["loop"].items() if k not in WALL_CLOCK_LOOP_KEYS}
    loop["history"] = [
        {k: v for k, v in row.items() if k not in WALL_CLOCK_LOOP_KEYS}
        for row in loop.get("history", [])
    ]
    return loop


def _compare_checkpoints(reference: RunDir, run: RunDir, result: Comparison) -> None:
    ref_root, run_root = reference.checkpoints, run.checkpoints
    ref_steps, run_steps = (
        checkpoint.committed_steps(ref_root),
        checkpoint.committed_steps(run_root),
    )
    if not ref_steps or not run_steps:
        result.differences.append(f"checkpoints: reference has {ref_steps}, run has {run_steps}")
        return
    if ref_steps[-1] != run_steps[-1]:
        result.differences.append(
            f"checkpoints: newest step {run_steps[-1]}, the reference's is {ref_steps[-1]}"
        )
        return
    for step in sorted(set(ref_steps) & set(run_steps)):
        try:
            ref = checkpoint.load(checkpoint.path_for(ref_root, step))
            ours = checkpoint.load(checkpoint.path_for(run_root, step))
        except durable.CorruptArtifact as exc:
            result.differences.append(f"checkpoint {step}: does not verify ({exc})")
            continue
        result.checkpoints.append(step)
        if ours.meta["loop"]["step_in_epoch"]:
            result.mid_epoch_checkpoints += 1
        if sorted(ref.arrays) != sorted(ours.arrays):
            result.differences.append(f"checkpoint {step}: different array names")
            continue
        for name, array in ref.arrays.items():
            result.arrays += 1
            other = ours.arrays[name]
            if array.dtype != other.dtype or not np.array_equal(array, other):
                result.differences.append(f"checkpoint {step}: {name} differs")
        if loop_state(ref.meta) != loop_state(ours.meta):
            result.differences.append(
                f"checkpoint {step}: loop state differs: "
                f"{_first_difference(loop_state(ref.meta), loop_state(ours.meta))}"
            )
        ref_meta = {
            k: v for k, v in ref.meta.items() if k not in WALL_CLOCK_META_KEYS and k != "loop"
        }
        our_meta = {
            k: v for k, v in ours.meta.items() if k not in WALL_CLOCK_META_KEYS and k != "loop"
        }
        if ref_meta != our_meta:
            result.differences.append(
                f"checkpoint {step}: meta differs: {_first_difference(ref_meta, our_meta)}"
            )


def scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run as TensorBoard's own loader reads it: "<run>/<tag>" ->
    [(step, value)] (tblog.scalars)."""
    from pipeline import tblog

    return tblog.scalars(run.tensorboard)


def repeated_scalar_steps(run: RunDir) -> list[tuple[str, int]]:
    """(tag, step) pairs written more than once in the raw event files. TensorBoard's loader
    hides some repeats (it purges events after a session-start marker); other readers of the
    files (the report, a plain event reader) do not, so the files themselves must hold each
    step once."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    from pipeline import tblog

    seen: dict[tuple[str, int], int] = {}
    for path in tblog.event_files(run.tensorboard):
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    key = (tblog.scalar_key(run.tensorboard, path, value.tag), event.step)
                    seen[key] = seen.get(key, 0) + 1
    return sorted(key for key, count in seen.items() if count > 1)


def _compare_scalars(reference: RunDir, run: RunDir, result: Comparison) -> None:
    ref, ours = scalars(reference), scalars(run)
    for tag, values in ours.items():
        steps = [step for step, _ in values]
        if len(steps) != len(set(steps)):
            result.differences.append(f"TensorBoard {tag}: a step is seen more than once")
    repeated = repeated_scalar_steps(run)
    if repeated:
        result.differences.append(
            f"event files: {len(repeated)} scalar steps written more than once, e.g. {repeated[0]}"
        )
    ref_tags = set(ref) - WALL_CLOCK_TAGS
    our_tags = set(ours) - WALL_CLOCK_TAGS
    if ref_tags != our_tags:
        result.differences.append(
            f"TensorBoard tags: missing {sorted(ref_tags - our_tags)}, "
            f"extra {sorted(our_tags - ref_tags)}"
        )
    for tag in sorted(ref_tags & our_tags):
        result.scalar_tags += 1
        result.scalar_values += len(ref[tag])
        if not _same_values(ref[tag], ours[tag]):
            result.differences.append(
                f"TensorBoard {tag}: {_first_difference(ref[tag], ours[tag])}"
            )


def _same_values(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(
        sa == sb and (va == vb or (math.isnan(va) and math.isnan(vb)))
        for (sa, va), (sb, vb) in zip(a, b, strict=True)
    )


def _compare_metrics(reference: RunDir, run: RunDir, result: Comparison) -> None:
    try:
        ref, ours = reference.read_metrics(), run.read_metrics()
    except (OSError, ValueError) as exc:
        result.differences.append(f"metrics.json: cannot be read ({exc})")
        return
    for key in ("test_loss", "test_accuracy", "checkpoint_step", "test_images"):
        if ref.get(key) != ours.get(key):
            result.differences.append(
                f"metrics.json {key}: {ours.get(key)!r}, not {ref.get(key)!r}"
            )


def newest_export(run: RunDir) -> Path | None:
    """The highest version number among every exported model's versions."""
    found = [(v, m) for m in run.export_models() for v in run.export_versions(m)]
    if not found:
        return None
    version, model = max(found, key=lambda vm: vm[0])
    return run.export_version(model, version)


def exported_predictions(run: RunDir, images: int = PREDICTION_IMAGES) -> np.ndarray:
    """Probabilities of the run's newest SavedModel (loaded by TensorFlow, not by us) on the
    run's own test images, read from its verified data cache."""
    import tensorflow as tf

    version = newest_export(run)
    if version is None:
        raise FileNotFoundError(f"no exported version under {run.export_dir}")
    x = run.prepared_data("x_test")["x_test"][:images]
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    return serve(image=tf.constant(x))["probabilities"].numpy()


def _compare_predictions(reference: RunDir, run: RunDir, result: Comparison) -> None:
    try:
        ref, ours = exported_predictions(reference), exported_predictions(run)
    except (OSError, durable.CorruptArtifact) as exc:
        result.differences.append(f"exported predictions: {exc}")
        return
    result.predictions = len(ours)
    if ref.shape != ours.shape or not np.array_equal(ref, ours):
        result.differences.append("exported predictions differ")


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
        if len(a) != len(b):
            return f"{where.lstrip('.') or 'value'}: {len(b)} entries, not {len(a)}"
    return f"{where.lstrip('.') or 'value'}: {b!r}, not {a!r}"

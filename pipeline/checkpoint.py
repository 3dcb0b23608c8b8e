"""Training checkpoints: committed directories `checkpoints/step-<N>/` holding every array needed
to continue exactly (`state.npz`) and a manifest whose meta carries the loop position and the
library versions that wrote it (pipeline/versions.py).

The newest directory that verifies is "latest"; there is no pointer file to go stale. One that
fails verification is set aside as `<name>.corrupt` and the next older one is used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import durable, versions

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{9})$")


@dataclass
class Checkpoint:
    step: int
    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]  # what the caller of save() gave, and the step
    versions: dict[str, str] | None = None  # who wrote it; None: written before versions were


def committed_steps(root: Path) -> list[int]:
    """Steps of the committed checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _NAME.match(p.name)))


def path_for(root: Path, step: int) -> Path:
    return root / f"step-{step:09d}"


def save(root: Path, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    final = path_for(root, step)
    durable.write_dir(
        final,
        lambda tmp: np.savez(tmp / "state.npz", **arrays),  # type: ignore[arg-type]
        {**meta, "step": step, "versions": versions.current()},
        size_hint=sum(a.nbytes for a in arrays.values()),
    )
    return final


def load(path: Path) -> Checkpoint:
    """Verify and read one checkpoint; raises durable.CorruptArtifact."""
    meta = durable.verify_dir(path)
    state = path / "state.npz"
    try:
        with durable.naming(state), np.load(state, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and durable.is_disk_failure(exc):
            raise  # the disk failed, not this checkpoint: never set a sound one aside for it
        raise durable.CorruptArtifact(f"{path}: unreadable state ({exc})") from exc
    written_by = versions.recorded(meta)
    meta = {k: v for k, v in meta.items() if k != "versions"}
    return Checkpoint(meta["step"], path, arrays, meta, written_by)


def load_latest(root: Path, only_step: int | None = None, owner: bool = True) -> Checkpoint | None:
    """The newest checkpoint that verifies (or exactly `only_step`).

    The owner of `root` sets bad ones aside; a reader that does not own it (a non-chief worker)
    only skips them, and skips one the owner moved away while it was reading.
    """
    steps = committed_steps(root)
    if only_step is not None:
        steps = [s for s in steps if s == only_step]
    for step in reversed(steps):
        path = path_for(root, step)
        try:
            return load(path)
        except FileNotFoundError:
            if owner:
                raise
        except durable.CorruptArtifact as exc:
            if not owner:
                continue
            moved = durable.set_aside(path)
            log.warning(
                "Checkpoint %s failed verification: %s. Set aside as %s; trying the "
                "next older one.",
                path,
                exc,
                moved.name,
            )
    if steps:
        log.warning("No checkpoint under %s verified; starting this stage over.", root)
    return None


def retain(root: Path, keep: int, best_step: int | None) -> None:
    """Delete all but the newest `keep` checkpoints, always keeping the best one."""
    steps = committed_steps(root)
    doomed = []
    for step in steps[:-keep]:
        if step == best_step:
            continue
        path = path_for(root, step)
        # Renamed to a temporary name first, so a kill mid-delete leaves only a temp to clean.
        doomed.append(path.with_name(f".{path.name}{durable.TMP_MARK}{os.getpid()}-del"))
        os.replace(path, doomed[-1])
    if doomed:
        # The renames reach the disk before any file goes: a power cut cannot bring back a
        # half-deleted checkpoint under its committed name.
        durable.fsync_dir(root)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)

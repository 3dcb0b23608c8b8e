"""`python -m pipeline status [run.name=NAME] [run.outputs=DIR] [--json]`: what every run is
doing, read from the run directories alone (no TensorFlow, no Hydra run). Runs are listed best
validation accuracy first, so a sweep reads as a leaderboard."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import checkpoint, durable, rundir
from pipeline.errors import ConfigError


def _record(path: Path) -> dict[str, Any] | None:
    try:
        return durable.read_record(path) if path.exists() else None
    except (durable.CorruptArtifact, FileNotFoundError):  # damaged, or deleted while read
        return None


def _disk_bytes(run_dir: Path) -> int:
    """Bytes of the run's files; files a running process renames or deletes meanwhile (its
    temporaries, retired checkpoints) are skipped, not a crash."""
    total = 0
    for top, _, files in os.walk(run_dir):  # a directory that vanishes is skipped
        for name in files:
            try:
                total += os.stat(os.path.join(top, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


def run_state(run_dir: Path) -> str:
    if rundir.is_running(run_dir):
        holder = rundir.lock_holder(run_dir / ".lock") or {}
        if holder.get("pid") != os.getpid():  # the holder's own report shows its session state
            return "running"
    session = _record(run_dir / "session.json") or {}
    state = session.get("state", "new")
    # A session that says "running" while nobody holds the lock was killed.
    return "interrupted" if state == "running" else state


def describe(run_dir: Path) -> dict[str, Any]:
    stages = {s: _record(run_dir / "stages" / f"{s}.json") for s in rundir.STAGES}
    steps = checkpoint.committed_steps(run_dir / "checkpoints")
    latest = checkpoint.path_for(run_dir / "checkpoints", steps[-1]) if steps else None
    meta: dict[str, Any] = {}
    if latest is not None:
        manifest = _record(latest / durable.MANIFEST)
        meta = (manifest or {}).get("meta", {})
    loop = meta.get("loop", {})
    history = loop.get("history", [])
    evaluate = stages["evaluate"] or {}
    session = _record(run_dir / "session.json") or {}
    return {
        "name": run_dir.name,
        "dir": str(run_dir),
        "state": run_state(run_dir),
        "message": session.get("message"),
        "stages_done": [s for s, rec in stages.items() if rec],
        "epoch": loop.get("epoch"),
        "step": loop.get("global_step"),
        "best_val_accuracy": loop.get("best_value"),
        "final_val_accuracy": history[-1].get("val_accuracy") if history else None,
        "test_accuracy": evaluate.get("test_accuracy"),
        "latest_checkpoint": str(latest) if latest else None,
        "checkpoint_age_s": time.time() - meta["time"] if "time" in meta else None,
        "resumes": loop.get("resumes", []),
        "disk_bytes": _disk_bytes(run_dir),
    }


def by_monitored_metric(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best validation accuracy first (the metric fit monitors for the best checkpoint); runs
    without one last, by name."""
    return sorted(
        rows,
        key=lambda r: (r["best_val_accuracy"] is None, -(r["best_val_accuracy"] or 0.0), r["name"]),
    )


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.2f}%"
    return str(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "RUN",
        "STATE",
        "STAGES DONE",
        "EPOCH",
        "STEP",
        "BEST VAL",
        "TEST ACC",
        "CHECKPOINT",
        "DIRECTORY",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["name"],
                r["state"],
                ",".join(r["stages_done"]) or "-",
                _fmt(r["epoch"]),
                _fmt(r["step"]),
                _fmt(r["best_val_accuracy"], True),
                _fmt(r["test_accuracy"], True),
                _age(r["checkpoint_age_s"]),
                r["dir"],
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def main(args: list[str]) -> int:
    try:
        run_dirs = rundir.select_runs("status", args, flags=("--json",))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    rows = by_monitored_metric([describe(d) for d in run_dirs])
    if "--json" in args:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("No runs yet. Start one with: python -m pipeline train")
    else:
        print(table(rows))
        if any(a.startswith("run.name=") for a in args):
            row = rows[0]
            print(f"\nlatest checkpoint: {row['latest_checkpoint'] or '-'}")
            print(f"disk usage: {row['disk_bytes'] / 1e6:.1f} MB")
            if row["message"]:
                print(f"last message: {row['message']}")
            for r in row["resumes"]:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
                print(f"resumed at step {r['step']} (epoch {r['epoch'] + 1}) on {when}")
    return 0

"""A run you can see at a glance.

`write_report(run)` reads a run directory (no TensorFlow) and writes `report.html`: one
self-contained file (images inlined as base64 PNGs, CSS inline, no external URLs) with the
config, learning curves, confusion matrix, per-class precision/recall, the worst mistakes, the
checkpoint/export inventory with sha256, stage timings and the resume history. It only reads:
the predictions it draws from are saved by the evaluate stage (`evaluate.record_evaluation`,
which also writes the evaluation's TensorBoard summaries).

This module reads the run into a plain `context` (dicts, lists, strings, numbers); the markup is
the Jinja template pipeline/templates/report.html, rendered with autoescaping, so text from the
run (config values, a session's failure message, paths) is escaped wherever it lands.
`python -m pipeline report [run.name=NAME] [run.outputs=DIR]` is `main`.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from pipeline import durable, rundir, visuals
from pipeline.config import flatten
from pipeline.rundir import RunDir

# ================================================================ reading a run

BATCH_LOSS, BATCH_ACCURACY = "train/batch_loss", "train/batch_accuracy"  # as tblog.scalars keys


def tensorboard_sessions(
    tb_dir: Path,
) -> tuple[dict[str, list[tuple[int, float]]], list[dict[str, Any]]]:
    """Scalars by tag (step, value; a later file wins a step) and, per event file that holds
    training steps, its step range, wall time and throughput."""
    from pipeline import tblog

    scalars: dict[str, dict[int, float]] = {}
    sessions = []
    for path in tblog.event_files(tb_dir) if tb_dir.is_dir() else []:
        train = []
        for event in tblog.events(path):
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    key = tblog.scalar_key(tb_dir, path, value.tag)
                    scalars.setdefault(key, {})[event.step] = value.simple_value
                    if key == BATCH_LOSS:
                        train.append((event.step, event.wall_time))
        if train:
            (first_step, first_time), (last_step, last_time) = train[0], train[-1]
            seconds = last_time - first_time
            sessions.append(
                {
                    "file": path.name,
                    "first_step": first_step,
                    "last_step": last_step,
                    "started": first_time,
                    "seconds": seconds,
                    "steps_per_second": (last_step - first_step) / seconds if seconds > 0 else None,
                }
            )
    return {tag: sorted(values.items()) for tag, values in scalars.items()}, sessions


def inventory(run: RunDir) -> list[dict[str, Any]]:
    """Every committed directory (data cache, checkpoints, export versions) with its manifest
    and whether it verifies now; directories set aside as corrupt are listed too."""
    candidates: list[tuple[str, Path]] = [("prepared data (shared)", run.data)]
    candidates += [("checkpoint", p) for p in run.checkpoint_dirs()]
    candidates += [("export", p) for p in run.export_dirs()]
    rows = []
    for kind, path in candidates:
        if not path.is_dir():
            continue
        row: dict[str, Any] = {
            "kind": kind,
            "path": path,
            "files": [],
            "meta": {},
            "status": "verified",
            "ok": True,
        }
        if ".corrupt" in path.name:
            row.update(status="set aside as corrupt", ok=False)
        try:
            manifest = durable.read_record(path / durable.MANIFEST)
            row["files"] = sorted(manifest["files"].items())
            row["meta"] = manifest.get("meta", {})
            if row["ok"]:
                durable.verify_dir(path)
        except (durable.CorruptArtifact, OSError, KeyError, TypeError) as exc:
            if isinstance(exc, OSError) and durable.is_disk_failure(exc):
                raise  # a failing disk fails the command (one error line), not a table row
            if not path.is_dir():
                continue  # deleted while read (checkpoint retention in a running fit)
            row.update(status=f"FAILED verification: {exc}", ok=False)
        rows.append(row)
    return rows


def load_predictions(run: RunDir) -> tuple[dict[str, np.ndarray] | None, str | None]:
    path = run.predictions
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        if isinstance(exc, OSError) and durable.is_disk_failure(exc):
            raise
        return None, f"{path} is unreadable ({exc})"


# ================================================================ the report's context

SECTIONS = (
    ("summary", "Summary"),
    ("curves", "Learning curves"),
    ("evaluation", "Test evaluation"),
    ("config", "Configuration"),
    ("timings", "Timings"),
    ("resumes", "Resume history"),
    ("inventory", "Checkpoints and exports"),
    ("model", "Model"),
)


def _figure(png: bytes, alt: str, tag: str) -> dict[str, Any]:
    """An inlined PNG for the template's `figure` macro."""
    data = base64.b64encode(png).decode("ascii")
    width, _ = visuals.png_size(png)
    # Markup (not escaped): a data URI built here from the bytes of a PNG that visuals drew
    # from numbers; base64 has no character HTML would need escaped. No user text is in it:
    # alt and tag are plain strings the template escapes.
    return {"tag": tag, "alt": alt, "width": width, "src": Markup(f"data:image/png;base64,{data}")}


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _summary(
    info: dict[str, Any], metrics: dict[str, Any] | None, loop: dict[str, Any]
) -> dict[str, Any]:
    return {
        "test_accuracy": (metrics or {}).get("test_accuracy"),
        "test_loss": (metrics or {}).get("test_loss"),
        "best_value": loop.get("best_value"),
        "epoch": loop.get("epoch", "-"),
        "global_step": loop.get("global_step", "-"),
        "resumes": len(loop.get("resumes", [])),
        "disk_bytes": info["disk_bytes"],
        "state": info["state"],
        "stages_done": ", ".join(info["stages_done"]) or "none",
        "message": info.get("message"),
    }


def _curves(
    history: list[dict[str, Any]],
    scalars: dict[str, list[tuple[int, float]]],
    resumes: list[dict[str, Any]],
) -> dict[str, Any]:
    if not history and not scalars.get(BATCH_LOSS):
        return {"figure": None, "history": []}
    step_scalars: dict[str, Sequence[tuple[int, float]]] = {
        key: scalars[key] for key in (BATCH_LOSS, BATCH_ACCURACY) if key in scalars
    }
    png = visuals.learning_curves_png(
        history, step_scalars, [r["step"] for r in resumes if r.get("step")]
    )
    columns = ("epoch", "step", "loss", "accuracy", "val_loss", "val_accuracy")
    alt = "learning curves: loss and accuracy against step"
    return {
        "figure": _figure(png, alt, "learning_curves"),
        "history": [{c: r.get(c) for c in columns} for r in history],
    }


def _evaluation(
    predictions: dict[str, np.ndarray] | None, problem: str | None, metrics: dict[str, Any] | None
) -> dict[str, Any]:
    if predictions is None:
        why = problem or (
            f"No {rundir.PREDICTIONS} yet: run the evaluate stage "
            "(python -m pipeline evaluate run.name=...)."
        )
        return {"problem": why}
    labels, probabilities = predictions["labels"], predictions["probabilities"]
    step = int(predictions["checkpoint_step"])
    counts = visuals.confusion_matrix(labels, probabilities.argmax(axis=-1))
    recorded = metrics or {}
    worst = predictions["worst_index"]
    grid = visuals.mistakes_grid_png(
        predictions["worst_images"],
        labels[worst],
        probabilities[worst],
        f"The {len(worst)} most confident mistakes",
    )
    return {
        "problem": None,
        "step": step,
        "stale_metrics": bool(recorded) and recorded.get("checkpoint_step") != step,
        "metrics_step": recorded.get("checkpoint_step"),
        "checkpoint": recorded.get("checkpoint", ""),
        "images": len(labels),
        "accuracy": float(np.trace(counts)) / max(len(labels), 1),
        "per_class": visuals.per_class_metrics(counts),
        "confusion": _figure(
            visuals.confusion_matrix_png(counts, f"Confusion matrix, step {step}"),
            "confusion matrix: rows true class, columns predicted class",
            "confusion_matrix",
        ),
        "worst": _figure(grid, "the most confident wrong predictions", "worst_mistakes"),
    }


def _config(
    record: dict[str, Any] | None, problem: str | None, fit: dict[str, Any] | None
) -> dict[str, Any]:
    if record is None:
        return {"problem": problem, "groups": []}
    identity = set(record.get("identity", {}))
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, value in sorted(flatten(record.get("config", {})).items()):
        group, _, name = key.rpartition(".")
        now = None
        if key == "fit.epochs" and fit and fit.get("epochs") not in (None, value):
            now = fit["epochs"]  # fit.epochs may change when a run is resumed
        groups.setdefault(group or "top level", []).append(
            {
                "key": key,
                "name": name,
                "value": json.dumps(value),
                "now": now,
                "identity": key in identity,
            }
        )
    order = ["data", "model", "optimizer", "fit", "top level"]
    names = sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), g))
    return {"problem": None, "groups": [{"name": g, "rows": groups[g]} for g in names]}


def _timings(run: RunDir, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    previous = None
    for stage in rundir.STAGES:
        rec = run.read_stage(stage)
        if not rec:
            rows.append({"stage": stage, "done": False})
            continue
        finished = rec.get("finished")
        gap: float | None = (
            finished - previous if finished is not None and previous is not None else None
        )
        detail = {
            "data": lambda r: f"source {r.get('source', '-')}",
            "model": lambda r: f"{r.get('parameters', '-')} parameters",
            "fit": lambda r: f"{r.get('epochs', '-')} epochs, step {r.get('global_step', '-')}",
            "evaluate": lambda r: (
                f"step {r.get('checkpoint_step', '-')}, test accuracy "
                f"{_pct(r.get('test_accuracy'))}"
            ),
            "export": lambda r: _relative(r.get("path", "-"), run.root),
        }[stage](rec)
        rows.append(
            {
                "stage": stage,
                "done": True,
                "finished": finished,
                "took": rec.get("seconds", rec.get("seconds_this_session")),
                "gap": gap,
                "detail": detail,
            }
        )
        previous = finished if finished is not None else previous
    return {"stages": rows, "sessions": sessions}


def _relative(path: str, run_dir: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return path


def _resumes(resumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        # The loop state counts epochs from 0; the report, like the log, from 1.
        {"step": r.get("step"), "epoch": r.get("epoch", 0) + 1, "time": r.get("time")}
        for r in resumes
    ]


def _inventory(run_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` of `inventory`, their paths shown relative to `run_dir`."""
    shown = []
    for row in rows:
        rel = Path(os.path.relpath(row["path"], run_dir))  # shared data sits beside the run
        meta = row["meta"]
        bits = [
            f"step {meta['step']}" if "step" in meta else "",
            f"from checkpoint step {meta['checkpoint_step']}" if "checkpoint_step" in meta else "",
        ]
        info = ", ".join(b for b in bits if b)
        total = sum(f["size"] for _, f in row["files"])
        summary = "; ".join(
            b for b in (info, f"{_plural(len(row['files']), 'file')}, {_size(total)}") if b
        )
        files = [
            {"path": str(rel / name), "size": f["size"], "sha256": f["sha256"]}
            for name, f in row["files"]
        ]
        shown.append(
            {
                "kind": row["kind"],
                "path": str(rel),
                "status": row["status"],
                "ok": row["ok"],
                "summary": summary,
                "files": files,
            }
        )
    return shown


def context(run_dir: RunDir | Path) -> dict[str, Any]:
    """Everything the report shows, as plain data (dicts, lists, strings, numbers; the figures'
    data URIs are the only Markup), read only: a damaged record shows as missing and stays put."""
    from pipeline import status

    run = RunDir.of(run_dir)
    info = status.describe(run)
    run_record: dict[str, Any] | None = None
    try:
        run_record, run_problem = run.read_run_record(), None
    except FileNotFoundError:
        run_problem = "missing"
    except durable.CorruptArtifact as exc:
        run_problem = str(exc)
    fit = run.read_stage("fit")
    metrics = None
    try:
        metrics = run.read_metrics()
    except ValueError:
        metrics = None
    except OSError as exc:
        if durable.is_disk_failure(exc):
            raise
        metrics = None
    _, meta = run.latest_checkpoint_meta() or (None, {})
    loop: dict[str, Any] = meta.get("loop", {})
    scalars, sessions = tensorboard_sessions(run.tensorboard)
    predictions, problem = load_predictions(run)
    summary_txt = run.model_summary
    return {
        "name": run.name,
        "root": str(run.root),
        "generated": time.time(),
        "latest": Path(info["latest_checkpoint"]).name if info["latest_checkpoint"] else "-",
        "sections": SECTIONS,
        "summary": _summary(info, metrics, loop),
        "curves": _curves(loop.get("history", []), scalars, loop.get("resumes", [])),
        "evaluation": _evaluation(predictions, problem, metrics),
        "config": _config(run_record, run_problem, fit),
        "timings": _timings(run, sessions),
        "resumes": _resumes(loop.get("resumes", [])),
        "inventory": _inventory(run.root, inventory(run)),
        "model_summary": summary_txt.read_text() if summary_txt.exists() else None,
    }


# ================================================================ HTML

TEMPLATES = Path(__file__).parent / "templates"


@functools.cache
def environment() -> jinja2.Environment:
    """The report's Jinja environment: every `{{ }}` is HTML-escaped (autoescape) unless the
    value is a Markup made in this module, and a name missing from the context is an error."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        pct=_pct, num=_num, size=_size, duration=_duration, when=_when, plural=_plural
    )
    return env


def render(run_dir: RunDir | Path) -> str:
    """The report of a run (templates/report.html over `context`)."""
    return environment().get_template("report.html").render(context(run_dir))


def write_report(run_dir: RunDir | Path) -> Path:
    """Write the run's report.html atomically and return its path."""
    run = RunDir.of(run_dir)
    durable.write_bytes(run.report, render(run).encode("utf-8"))
    return run.report


# ================================================================ command line


HELP = """\
usage: python -m pipeline report [run.name=NAME] [run.outputs=DIR]

Write report.html of one run (run.name), or of every run under run.outputs (default: outputs):
one self-contained page with the config, learning curves, confusion matrix, per-class
precision and recall, the worst mistakes, every checkpoint and export with its sha256, stage
timings and the resume history. Reads the run without TensorFlow; `train`, `evaluate` and
`export` keep it current on their own.
"""


def main(args: list[str]) -> int:
    """`python -m pipeline report [run.name=NAME] [run.outputs=DIR]`: write report.html of one
    run, or of every run under run.outputs."""
    if "--help" in args or "-h" in args:
        print(HELP, end="")
        return 0
    from pipeline.errors import PipelineError
    from pipeline.rundir import select_runs

    try:
        run_dirs = select_runs("report", args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not run_dirs:
        print("error: no runs yet. Start one with: python -m pipeline train", file=sys.stderr)
        return 2
    for run_dir in run_dirs:
        try:
            print(f"Report: {write_report(run_dir)}")
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

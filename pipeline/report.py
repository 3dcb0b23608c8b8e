"""A run you can see at a glance.

`write_report(run)` reads a run directory (no TensorFlow) and writes `report.html`: one
self-contained file (images inlined as base64 PNGs, CSS inline, no external URLs) with the
config, learning curves, confusion matrix, per-class precision/recall, the worst mistakes, the
checkpoint/export inventory with sha256, stage timings and the resume history. It only reads:
the predictions it draws from are saved by the evaluate stage (`evaluate.record_evaluation`,
which also writes the evaluation's TensorBoard summaries).
`python -m pipeline report [run.name=NAME] [run.outputs=DIR]` is `main`.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import durable, rundir, visuals
from pipeline.config import flatten
from pipeline.rundir import RunDir

# ================================================================ reading a run


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
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
                    if value.tag == "train/loss":
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


# ================================================================ HTML

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
  margin:0;background:#f4f5f7}
main{max-width:1140px;margin:0 auto;padding:20px 28px 40px;background:#fff}
h1{font-size:26px;margin:8px 0 2px}h2{font-size:20px;margin:30px 0 10px;
  border-bottom:2px solid #e3e5e8;padding-bottom:4px}h3{font-size:16px;margin:18px 0 6px}
h1 code{font-size:19px}.sub{color:#666;margin:0 0 14px}
code,pre{font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
pre{background:#f6f8fa;padding:10px;overflow-x:auto;border-radius:4px;line-height:1.2}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #e3e5e8;border-radius:6px;padding:8px 12px;flex:1 1 0;min-width:110px}
.card b{display:block;font-size:21px}.card span{color:#666;font-size:13px}
nav a{margin-right:14px;color:#0b5cad;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 12px;font-size:14px}
th,td{border-bottom:1px solid #e3e5e8;padding:4px 10px;text-align:left;vertical-align:top;
  overflow-wrap:break-word}td.nowrap{white-space:nowrap}
th{background:#f6f8fa}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.sha code{font-size:11.5px;word-break:break-all}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#888}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.groups{display:flex;flex-wrap:wrap;gap:6px 28px;align-items:flex-start}
.groups table{min-width:250px}.groups h3{margin:6px 0 0}
.tag{font-size:11px;background:#e8f0fe;color:#0b5cad;border-radius:3px;padding:0 4px}
img{max-width:100%;height:auto;border:1px solid #eee}
.fig{margin:8px 0}
"""

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


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str, tag: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    width, _ = visuals.png_size(png)
    return (
        f'<div class="fig"><img data-figure="{esc(tag)}" alt="{esc(alt)}" '
        f'width="{width}" src="data:image/png;base64,{data}"></div>'
    )


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


def _table(
    header: list[str],
    rows: list[list[str]],
    numeric: set[int] | None = None,
    cls: str = "",
    column_classes: dict[int, str] | None = None,
) -> str:
    classes = {i: "num" for i in numeric or set()} | (column_classes or {})

    def cell(tag: str, i: int, content: str) -> str:
        attr = f' class="{classes[i]}"' if i in classes else ""
        return f"<{tag}{attr}>{content}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(key: str, body: str) -> str:
    title = dict(SECTIONS)[key]
    return f'<section id="{key}"><h2>{esc(title)}</h2>\n{body}\n</section>\n'


def _summary(info: dict[str, Any], metrics: dict[str, Any] | None, loop: dict[str, Any]) -> str:
    cards = [
        ("test accuracy", _pct((metrics or {}).get("test_accuracy"))),
        ("test loss", _num((metrics or {}).get("test_loss"))),
        ("best validation accuracy", _pct(loop.get("best_value"))),
        ("epochs done", esc(loop.get("epoch", "-"))),
        ("steps", esc(loop.get("global_step", "-"))),
        ("resumes", esc(len(loop.get("resumes", [])))),
        ("disk", _size(info["disk_bytes"])),
    ]
    html_cards = "".join(
        f'<div class="card"><b>{value}</b><span>{esc(label)}</span></div>' for label, value in cards
    )
    stages = ", ".join(info["stages_done"]) or "none"
    extra = f'<p class="note">{esc(info["message"])}</p>' if info.get("message") else ""
    return (
        f'<div class="cards">{html_cards}</div><p>State: <b>{esc(info["state"])}</b>; '
        f"stages done: {esc(stages)}.</p>{extra}"
    )


def _curves(
    history: list[dict[str, Any]],
    scalars: dict[str, list[tuple[int, float]]],
    resumes: list[dict[str, Any]],
) -> str:
    if not history and not scalars.get("train/loss"):
        return '<p class="muted">No training steps logged yet.</p>'
    step_scalars: dict[str, Sequence[tuple[int, float]]] = {
        tag: scalars[tag] for tag in ("train/loss", "train/accuracy") if tag in scalars
    }
    png = visuals.learning_curves_png(
        history, step_scalars, [r["step"] for r in resumes if r.get("step")]
    )
    rows = [
        [
            esc(r.get("epoch")),
            esc(r.get("step")),
            _num(r.get("loss")),
            _pct(r.get("accuracy")),
            _num(r.get("val_loss")),
            _pct(r.get("val_accuracy")),
        ]
        for r in history
    ]
    table = _table(
        ["epoch", "step", "train loss", "train accuracy", "val loss", "val accuracy"],
        rows,
        numeric={0, 1, 2, 3, 4, 5},
        cls="history",
    )
    return (
        _img(png, "learning curves: loss and accuracy against step", "learning_curves")
        + "<h3>Per epoch</h3>"
        + table
    )


def _evaluation(
    predictions: dict[str, np.ndarray] | None, problem: str | None, metrics: dict[str, Any] | None
) -> str:
    if predictions is None:
        why = problem or (
            f"No {rundir.PREDICTIONS} yet: run the evaluate stage "
            "(python -m pipeline evaluate run.name=...)."
        )
        return f'<p class="note">{esc(why)}</p>'
    labels, probabilities = predictions["labels"], predictions["probabilities"]
    step = int(predictions["checkpoint_step"])
    counts = visuals.confusion_matrix(labels, probabilities.argmax(axis=-1))
    parts = []
    if metrics and metrics.get("checkpoint_step") != step:
        parts.append(
            f'<p class="note">These predictions are from step {step}, but '
            f"metrics.json is from step {esc(metrics.get('checkpoint_step'))}.</p>"
        )
    which = (metrics or {}).get("checkpoint", "")
    parts.append(
        f"<p>Checkpoint step {step}{f' ({esc(which)})' if which else ''}, "
        f"{len(labels)} test images, accuracy "
        f"{_pct(float(np.trace(counts)) / max(len(labels), 1))}.</p>"
    )
    rows = [
        [
            esc(r["class"]),
            esc(r["support"]),
            esc(r["predicted"]),
            esc(r["correct"]),
            _pct(r["precision"]),
            _pct(r["recall"]),
            _num(r["f1"], 3),
        ]
        for r in visuals.per_class_metrics(counts)
    ]
    table = _table(
        ["class", "true", "predicted", "correct", "precision", "recall", "F1"],
        rows,
        numeric={0, 1, 2, 3, 4, 5, 6},
        cls="per-class",
    )
    confusion = _img(
        visuals.confusion_matrix_png(counts, f"Confusion matrix, step {step}"),
        "confusion matrix: rows true class, columns predicted class",
        "confusion_matrix",
    )
    parts.append(
        f'<div class="row"><div>{confusion}</div><div><h3>Per class</h3>{table}</div></div>'
    )
    worst = predictions["worst_index"]
    grid = visuals.mistakes_grid_png(
        predictions["worst_images"],
        labels[worst],
        probabilities[worst],
        f"The {len(worst)} most confident mistakes",
    )
    parts.append(
        "<h3>Worst mistakes</h3><p>Wrong predictions made with the highest "
        "probability, captioned true class / predicted class (probability).</p>"
    )
    parts.append(_img(grid, "the most confident wrong predictions", "worst_mistakes"))
    return "\n".join(parts)


def _config(record: dict[str, Any] | None, problem: str | None, fit: dict[str, Any] | None) -> str:
    if record is None:
        return f'<p class="note">run.json: {esc(problem)}</p>'
    identity = set(record.get("identity", {}))
    groups: dict[str, list[list[str]]] = {}
    for key, value in sorted(flatten(record.get("config", {})).items()):
        group, _, name = key.rpartition(".")
        shown = esc(json.dumps(value))
        if key == "fit.epochs" and fit and fit.get("epochs") not in (None, value):
            shown += f' <span class="muted">(now {esc(fit["epochs"])})</span>'
        if key in identity:
            shown += ' <span class="tag" title="part of the run\'s identity">id</span>'
        groups.setdefault(group or "top level", []).append(
            [f'<code title="{esc(key)}">{esc(name)}</code>', shown]
        )
    order = ["data", "model", "optimizer", "fit", "top level"]
    names = sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), g))
    tables = "".join(
        f"<div><h3>{esc(g)}</h3>{_table(['key', 'value'], groups[g], cls='config')}</div>"
        for g in names
    )
    return (
        "<p>As recorded when the run was created (<code>run.json</code>). Keys marked "
        '<span class="tag">id</span> are the run\'s identity: changing one needs a new run.'
        f'</p><div class="groups">{tables}</div>'
    )


def _timings(run: RunDir, sessions: list[dict[str, Any]]) -> str:
    rows, previous = [], None
    for stage in rundir.STAGES:
        rec = run.read_stage(stage)
        if not rec:
            rows.append([esc(stage), '<span class="muted">not done</span>', "-", "-", ""])
            continue
        finished = rec.get("finished")
        took = rec.get("seconds", rec.get("seconds_this_session"))
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
        rows.append([esc(stage), _when(finished), _duration(took), _duration(gap), esc(detail)])
        previous = finished if finished is not None else previous
    out = _table(
        ["stage", "finished", "took", "after previous stage", ""],
        rows,
        numeric={2, 3},
        cls="stages",
        column_classes={1: "nowrap"},
    )
    out += (
        '<p class="muted">"took" is recorded for fit (this session\'s training time); '
        '"after previous stage" is the time between finish stamps, which includes other '
        "sessions if the stages ran in different ones.</p>"
    )
    if sessions:
        srows = [
            [
                esc(s["file"]),
                _when(s["started"]),
                f"{s['first_step']}–{s['last_step']}",
                _duration(s["seconds"]),
                _num(s["steps_per_second"], 1),
            ]
            for s in sessions
        ]
        out += "<h3>Training sessions (TensorBoard event files)</h3>" + _table(
            ["event file", "first step logged at", "steps logged", "wall time", "steps/s"],
            srows,
            numeric={3, 4},
            cls="sessions",
            column_classes={1: "nowrap"},
        )
    return out


def _relative(path: str, run_dir: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return path


def _resumes(resumes: list[dict[str, Any]]) -> str:
    if not resumes:
        return "<p>Never resumed: trained in one session.</p>"
    rows = [
        [esc(i + 1), esc(r.get("step")), esc(r.get("epoch", 0) + 1), _when(r.get("time"))]
        for i, r in enumerate(resumes)
    ]
    return (
        f"<p>Resumed {_plural(len(resumes), 'time')}; each session continued exactly "
        "from the checkpoint named here (the dashed lines in the learning curves).</p>"
        + _table(
            ["#", "resumed from step", "in epoch", "at"],
            rows,
            numeric={0, 1, 2},
            cls="resumes",
            column_classes={3: "nowrap"},
        )
    )


def _inventory(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    """`rows` of `inventory`, their paths shown relative to `run_dir`."""
    if not rows:
        return '<p class="muted">No checkpoints or exports yet.</p>'
    parts = []
    for row in rows:
        rel = Path(os.path.relpath(row["path"], run_dir))  # shared data sits beside the run
        status = (
            f'<span class="ok">{esc(row["status"])}</span>'
            if row["ok"]
            else f'<span class="bad">{esc(row["status"])}</span>'
        )
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
        parts.append(
            f"<h3>{esc(row['kind'])} <code>{esc(rel)}</code> {status}</h3>"
            f'<p class="muted">{esc(summary)}</p>'
        )
        files = [
            [
                f"<code>{esc(rel / name)}</code>",
                f'<span title="{f["size"]} bytes">{_size(f["size"])}</span>',
                f"<code>{esc(f['sha256'])}</code>",
            ]
            for name, f in row["files"]
        ]
        if files:
            parts.append(
                _table(
                    ["file", "size", "sha256 (from MANIFEST.json)"],
                    files,
                    numeric={1},
                    cls="files",
                    column_classes={0: "path", 2: "sha"},
                )
            )
    return "\n".join(parts)


def render(run_dir: RunDir | Path) -> str:
    """The report of a run, read only: a damaged record shows as missing and stays put."""
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
    model = (
        f"<pre>{esc(summary_txt.read_text())}</pre>"
        if summary_txt.exists()
        else '<p class="muted">No model summary yet.</p>'
    )
    body = "".join(
        [
            _section("summary", _summary(info, metrics, loop)),
            _section("curves", _curves(loop.get("history", []), scalars, loop.get("resumes", []))),
            _section("evaluation", _evaluation(predictions, problem, metrics)),
            _section("config", _config(run_record, run_problem, fit)),
            _section("timings", _timings(run, sessions)),
            _section("resumes", _resumes(loop.get("resumes", []))),
            _section("inventory", _inventory(run.root, inventory(run))),
            _section("model", model),
        ]
    )
    nav = " ".join(f'<a href="#{key}">{esc(title)}</a>' for key, title in SECTIONS)
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    latest = Path(info["latest_checkpoint"]).name if info["latest_checkpoint"] else "-"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Run {esc(run.name)}: report</title><style>{CSS}</style></head>\n"
        f"<body><main><h1>Run <code>{esc(run.name)}</code></h1>"
        f'<p class="sub">{esc(run.root)} · report generated {generated} · '
        f"newest checkpoint {esc(latest)}"
        f"</p><nav>{nav}</nav>\n{body}</main></body></html>\n"
    )


def write_report(run_dir: RunDir | Path) -> Path:
    """Write the run's report.html atomically and return its path."""
    run = RunDir.of(run_dir)
    durable.write_bytes(run.report, render(run).encode("utf-8"))
    return run.report


# ================================================================ command line


def main(args: list[str]) -> int:
    """`python -m pipeline report [run.name=NAME] [run.outputs=DIR]`: write report.html of one
    run, or of every run under run.outputs."""
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

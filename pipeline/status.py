"""`python -m pipeline status [run.name=NAME] [run.outputs=DIR] [--json]`: what every run is
doing, read from the run directories alone (no TensorFlow, no Hydra run). Runs are listed best
validation accuracy first, so a sweep reads as a leaderboard.

`status --study NAME`: the trials of a search (`python -m pipeline tune`), best first, read from
the summary the search keeps beside its study (<run.outputs>/.tune/NAME.json; no Optuna)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import durable, rundir
from pipeline.errors import ConfigError
from pipeline.rundir import RunDir


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


def run_state(run_dir: RunDir | Path) -> str:
    run = RunDir.of(run_dir)
    if rundir.is_running(run):
        holder = rundir.lock_holder(run.lock) or {}
        if holder.get("pid") != os.getpid():  # the holder's own report shows its session state
            return "running"
    session = run.read_session() or {}
    state = session.get("state", "new")
    # A session that says "running" while nobody holds the lock was killed.
    return "interrupted" if state == "running" else state


def describe(run_dir: RunDir | Path) -> dict[str, Any]:
    """One run's row; reading only, so a damaged record shows as missing and stays put."""
    run = RunDir.of(run_dir)
    stages = {s: run.read_stage(s) for s in rundir.STAGES}
    latest, meta = run.latest_checkpoint_meta() or (None, {})
    loop = meta.get("loop", {})
    history = loop.get("history", [])
    evaluate = stages["evaluate"] or {}
    session = run.read_session() or {}
    return {
        "name": run.name,
        "dir": str(run.root),
        "state": run_state(run),
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
        "disk_bytes": _disk_bytes(run.root),  # the run's own files: its data is shared
        "data_dir": str(run.data),
    }


def study_summaries(outputs: Path) -> dict[str, dict[str, Any]]:
    """The summaries of the studies under `outputs` by name; a damaged one is skipped."""
    found: dict[str, dict[str, Any]] = {}
    try:
        paths = sorted(rundir.studies(outputs).glob("*.json"))
    except OSError:  # a failing disk: the runs' own rows say so
        return found
    for path in paths:
        try:
            summary = durable.read_record(path)
        except (OSError, durable.CorruptArtifact):
            continue
        if isinstance(summary, dict) and isinstance(summary.get("trials"), list):
            found[path.stem] = summary
    return found


def mark_studies(rows: list[dict[str, Any]]) -> None:
    """Set each row's `study` and `trial` (None for a run no search made)."""
    owners: dict[str, tuple[str, int]] = {}
    for outputs in sorted({Path(r["dir"]).parent for r in rows}):
        for name, summary in study_summaries(outputs).items():
            for trial in summary["trials"]:
                if trial.get("run"):
                    owners.setdefault(str(outputs / trial["run"]), (name, trial["number"]))
    for r in rows:
        r["study"], r["trial"] = owners.get(r["dir"], (None, None))


def best_trials_first(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete trials by value, best first; then pruned ones by value, running, failed,
    waiting; ties by trial number."""
    rank = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "FAIL": 3, "WAITING": 4}

    def key(t: dict[str, Any]) -> tuple[Any, ...]:
        value = t.get("value")
        best = -float(value) if isinstance(value, (int, float)) else float("inf")
        return (rank.get(str(t.get("state")), 5), best, t["number"])

    return sorted(trials, key=key)


def study_table(summary: dict[str, Any]) -> str:
    """A study's trials, best first."""
    header = ("TRIAL", "STATE", "VALUE", "PARAMS", "RUN")
    lines = [header]
    for t in best_trials_first(summary["trials"]):
        params = " ".join(f"{k}={v}" for k, v in t.get("params", {}).items())
        state = t["state"] + (f" ({t['message']})" if t.get("message") else "")
        value = t.get("value")
        lines.append(
            (
                str(t["number"]),
                state,
                _fmt(value, True) if isinstance(value, (int, float)) else "-",
                params or "-",
                t.get("run") or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def study_main(args: list[str], name: str) -> int:
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = [a for a in args if a != "--json" and not a.startswith("run.outputs=")]
    if unknown:
        print(
            f"error: status --study takes run.outputs=DIR and --json, not {unknown[0]}",
            file=sys.stderr,
        )
        return ConfigError.exit_code
    outputs = Path(options.get("run.outputs", "outputs"))
    summaries = study_summaries(outputs)
    if name not in summaries:
        known = ", ".join(summaries) or "none yet"
        print(
            f"error: no study {name!r} in {rundir.studies(outputs)} (studies: {known})",
            file=sys.stderr,
        )
        return ConfigError.exit_code
    summary = {**summaries[name], "trials": best_trials_first(summaries[name]["trials"])}
    if "--json" in args:
        print(json.dumps(summary, indent=2))
        return 0
    done = sum(t["state"] in ("COMPLETE", "PRUNED", "FAIL") for t in summary["trials"])
    print(
        f"study {name}: {done} of {summary.get('trials_wanted', '?')} trials finished, "
        f"objective: {summary.get('objective', '?')} (best first); storage {summary['storage']}"
    )
    print(study_table(summary))
    return 0


def take_study(args: list[str]) -> tuple[str | None, list[str]]:
    """Split off `--study NAME` (or `--study=NAME`)."""
    study, rest = None, []
    items = iter(args)
    for arg in items:
        name, eq, value = arg.partition("=")
        if name != "--study":
            rest.append(arg)
            continue
        study = value if eq else next(items, "")
    return study, rest


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
    studies = any(r.get("study") for r in rows)  # the column only when a search made a run
    header = (
        "RUN",
        *(("STUDY",) if studies else ()),
        "STATE",
        "STAGES DONE",
        "EPOCH",
        "STEP",
        "BEST VAL",
        "TEST ACC",
        "CHECKPOINT",
        "DISK",
        "DIRECTORY",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["name"],
                *((f"{r['study']}#{r['trial']}" if r.get("study") else "-",) if studies else ()),
                r["state"],
                ",".join(r["stages_done"]) or "-",
                _fmt(r["epoch"]),
                _fmt(r["step"]),
                _fmt(r["best_val_accuracy"], True),
                _fmt(r["test_accuracy"], True),
                _age(r["checkpoint_age_s"]),
                f"{r['disk_bytes'] / 1e6:.1f} MB",
                r["dir"],
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


HELP = """\
usage: python -m pipeline status [run.name=NAME] [run.outputs=DIR] [--json]
       python -m pipeline status --study NAME [run.outputs=DIR] [--json]

What every run under run.outputs (default: outputs) is doing, best validation accuracy first:
state (running, interrupted, done, failed), stages done, epoch, step, accuracies, the age of
the newest checkpoint, the run's own disk use, and the shared prepared data. With run.name,
one run in detail (its resumes, disk use, last message). --json prints the same as records,
for scripts. Reads run directories only: no TensorFlow, and a running run is never touched.
Runs made by a search (python -m pipeline tune) show their study and trial number; --study
NAME lists that study's trials best first.
"""


def main(args: list[str]) -> int:
    if "--help" in args or "-h" in args:
        print(HELP, end="")
        return 0
    study, args = take_study(args)
    if study is not None:
        if not study:
            print("error: --study needs a name: --study NAME", file=sys.stderr)
            return ConfigError.exit_code
        return study_main(args, study)
    try:
        run_dirs = rundir.select_runs("status", args, flags=("--json",))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    rows = by_monitored_metric([describe(d) for d in run_dirs])
    mark_studies(rows)
    if "--json" in args:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("No runs yet. Start one with: python -m pipeline train")
    else:
        print(table(rows))
        for cache in sorted({rundir.data_cache(Path(r["dir"]).parent) for r in rows}):
            entries = [p for p in cache.glob("*") if p.is_dir() and "." not in p.name]
            if entries:
                size = sum(_disk_bytes(p) for p in entries)
                print(
                    f"\nshared prepared data: {len(entries)} dataset(s), {size / 1e6:.1f} MB "
                    f"in {cache}"
                )
        if any(a.startswith("run.name=") for a in args):
            row = rows[0]
            print(f"\nlatest checkpoint: {row['latest_checkpoint'] or '-'}")
            print(
                f"disk usage: {row['disk_bytes'] / 1e6:.1f} MB (prepared data: {row['data_dir']})"
            )
            if row["message"]:
                print(f"last message: {row['message']}")
            for r in row["resumes"]:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
                print(f"resumed at step {r['step']} (epoch {r['epoch'] + 1}) on {when}")
    return 0

"""Mutation check: break the package on purpose, one fault at a time, and show a test catches it.

    python scripts/mutation_check.py                 # every mutation, then the unmutated baseline
    python scripts/mutation_check.py --only fsync-dir,permutation-epoch
    python scripts/mutation_check.py --list

Each mutation is an exact text edit of a copy of the checkout (the working tree is never
touched); the copy's tests named for that mutation run against the mutated package (PYTHONPATH
puts the copy first, and the tests' subprocesses inherit it). A mutation is caught when those
tests fail. The same tests must pass on the unmutated copy, or the check proves nothing. Exit 0
only if every mutation was caught and the baseline passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESUME = "tests/test_resume.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    fault: str
    edits: tuple[tuple[str, str, str], ...]  # (file, exact old text, new text)
    tests: tuple[str, ...]  # pytest node ids expected to catch it


MUTATIONS = [
    Mutation(
        "accumulators-not-restored",
        "the epoch's metric accumulators are not restored on resume",
        (
            (
                "pipeline/fit.py",
                "        for name, var in variables:\n            var.assign(arrays[name])\n",
                "        for name, var in variables:\n"
                '            if not name.startswith("loop/"):\n'
                "                var.assign(arrays[name])\n",
            ),
        ),
        (f"{RESUME}::test_kills_inside_checkpoint_writes_resume_bit_identical",),
    ),
    Mutation(
        "permutation-epoch",
        "off by one in the permutation epoch of a session resumed mid-epoch",
        (
            (
                "pipeline/fit.py",
                "order = permutation(t.seed, s.epoch, t.n_train)",
                "order = permutation(t.seed, s.epoch + int(s.step_in_epoch > 0), t.n_train)",
            ),
        ),
        (f"{RESUME}::test_kills_inside_checkpoint_writes_resume_bit_identical",),
    ),
    Mutation(
        "events-not-cut",
        "TensorBoard events written after the last checkpoint are not cut on resume",
        (
            (
                "pipeline/fit.py",
                "dropped = tblog.truncate_after(tb_dir, state.global_step)",
                "dropped = 0",
            ),
        ),
        (f"{RESUME}::test_kills_inside_checkpoint_writes_resume_bit_identical",),
    ),
    Mutation(
        "patience-reset",
        "the early-stopping patience counter restarts at 0 on resume",
        (
            (
                "pipeline/fit.py",
                '        state = LoopState(**latest.meta["loop"])\n',
                '        state = LoopState(**latest.meta["loop"])\n'
                "        state.epochs_without_improvement = 0\n",
            ),
        ),
        ("tests/test_promises.py::test_early_stopping_stops_and_its_patience_survives_a_kill",),
    ),
    Mutation(
        "determinism-only-in-fit",
        "op determinism set up only when the trainer is built (evaluate in a fresh process)",
        (
            (
                "pipeline/models/__init__.py",
                "    tf.config.experimental.enable_op_determinism()\n",
                "",
            ),
            (
                "pipeline/fit.py",
                "        keras.utils.set_random_seed(seed)\n",
                "        keras.utils.set_random_seed(seed)\n"
                "        tf.config.experimental.enable_op_determinism()\n",
            ),
        ),
        (f"{RESUME}::test_evaluate_in_a_fresh_process_gives_the_same_bits",),
    ),
    Mutation(
        "nan-unchecked",
        "a non-finite loss is never checked",
        (
            (
                "pipeline/fit.py",
                "        bad = int(self.t.first_bad_step.numpy())\n",
                "        bad = 0\n",
            ),
        ),
        (f"{RESUME}::test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint",),
    ),
    Mutation(
        "signal-not-graceful",
        "SIGINT during fit stops at once instead of saving a checkpoint",
        (("pipeline/fit.py", "    ctx.stop.graceful = True\n", ""),),
        (f"{RESUME}::test_sigint_saves_a_checkpoint_and_says_how_to_resume",),
    ),
    Mutation(
        "finished-fit-trusted",
        "a finished fit is trusted although its final checkpoint no longer verifies",
        (
            (
                "pipeline/fit.py",
                '    return latest is not None and latest.step == done["global_step"]',
                "    return True",
            ),
        ),
        (f"{RESUME}::test_finished_fit_with_a_damaged_final_checkpoint_is_resumed_not_trusted",),
    ),
    Mutation(
        "evaluation-kept-after-fit",
        "an evaluation is kept although a resumed fit cut its TensorBoard events",
        (
            (
                "pipeline/fit.py",
                '    rundir.clear_stage(ctx.run, "evaluate")\n',
                "",
            ),
        ),
        (f"{RESUME}::test_finished_fit_with_a_damaged_final_checkpoint_is_resumed_not_trusted",),
    ),
    Mutation(
        "no-lock",
        "the run lock is never taken: a second process runs on the same run",
        (
            (
                "pipeline/rundir.py",
                "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n",
                "            pass\n",
            ),
        ),
        (f"{RESUME}::test_second_process_on_the_same_run_is_refused",),
    ),
    Mutation(
        "manifest-unchecked",
        "verify_dir skips the sha256 check of each file",
        (
            (
                "pipeline/durable.py",
                '        if sha256_file(file) != expected["sha256"]:\n',
                "        if False:\n",
            ),
        ),
        ("tests/test_faults.py::test_corrupt_newest_checkpoint_falls_back_to_the_previous_one",),
    ),
    Mutation(
        "no-fallback",
        "a damaged newest checkpoint makes the stage start over instead of using the previous one",
        (
            (
                "pipeline/checkpoint.py",
                "            moved = durable.set_aside(path)\n",
                "            return None\n            moved = durable.set_aside(path)\n",
            ),
        ),
        ("tests/test_checkpoint.py::test_load_latest_skips_several_bad_ones",),
    ),
    Mutation(
        "retention-drops-best",
        "retention deletes the best checkpoint (checkpoint.keep's exception ignored)",
        (
            (
                "pipeline/checkpoint.py",
                "        if step == best_step:\n            continue\n",
                "",
            ),
        ),
        ("tests/test_checkpoint.py::test_retain",),
    ),
    Mutation(
        "data-cache-unverified",
        "the prepared-data cache is trusted without verifying its manifest",
        (
            (
                "pipeline/data.py",
                "        return durable.verify_dir(cache_dir)\n",
                "        return durable.read_record(cache_dir / durable.MANIFEST)['meta']\n",
            ),
        ),
        ("tests/test_data.py::test_prepare_sets_aside_corrupt_cache",),
    ),
    Mutation(
        "export-unverified",
        "an export is published without checking its formats against the model",
        (
            (
                "pipeline/export.py",
                "    if not same_class or max_diff > TOLERANCE[fmt]:\n",
                "    if False:\n",
            ),
        ),
        ("tests/test_export.py::test_an_export_that_fails_its_check_is_not_published",),
    ),
    Mutation(
        "fsync-dir",
        "fsync_dir does nothing (renames and new names are not made durable)",
        (
            (
                "pipeline/durable.py",
                "    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)\n",
                "    return\n    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)\n",
            ),
        ),
        ("tests/test_power_cut.py",),
    ),
    Mutation(
        "file-fsync",
        "write_file renames its temp file without fsyncing it",
        (
            (
                "pipeline/durable.py",
                '        with open(tmp, "rb+") as handle:\n            os.fsync(handle.fileno())\n'
                '        failpoint("file_after_fsync")\n',
                '        failpoint("file_after_fsync")\n',
            ),
        ),
        ("tests/test_power_cut.py",),
    ),
    Mutation(
        "commit-file-fsync",
        "commit_dir renames a directory without fsyncing the files in it",
        (
            (
                "pipeline/durable.py",
                '            with open(path, "rb+") as handle:\n'
                "                os.fsync(handle.fileno())\n",
                "",
            ),
        ),
        ("tests/test_power_cut.py",),
    ),
    Mutation(
        "manifest-fsync",
        "commit_dir does not fsync the MANIFEST.json it writes",
        (
            (
                "pipeline/durable.py",
                "            handle.flush()\n            os.fsync(handle.fileno())\n",
                "            handle.flush()\n",
            ),
        ),
        ("tests/test_power_cut.py",),
    ),
    Mutation(
        "tmp-dir-fsync",
        "commit_dir renames the temporary directory without fsyncing its listing first",
        (
            (
                "pipeline/durable.py",
                '        fsync_dir(tmp)\n        failpoint("dir_before_rename")\n',
                '        failpoint("dir_before_rename")\n',
            ),
        ),
        ("tests/test_power_cut.py",),
    ),
    Mutation(
        "restart-anywhere",
        "run.restart=true deletes in any directory a typed run.name/run.outputs reaches",
        (
            (
                "pipeline/rundir.py",
                "    if not run_dir.exists() and not run_dir.is_symlink():\n        return\n",
                "    return\n",
            ),
        ),
        ("tests/test_hostile_paths.py::test_hostile_values_change_nothing_outside_the_run",),
    ),
]


def make_copy(where: Path) -> Path:
    copy = where / "checkout"
    shutil.copytree(
        ROOT,
        copy,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "outputs", "__pycache__", ".pytest_cache", ".mypy_cache", "*.egg-info"
        ),
    )
    return copy


def apply(copy: Path, mutation: Mutation) -> None:
    for file, old, new in mutation.edits:
        path = copy / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(
                f"mutation {mutation.name}: the text to change occurs {text.count(old)} times in "
                f"{file} (expected once); update scripts/mutation_check.py"
            )
        path.write_text(text.replace(old, new))


def run_tests(copy: Path, tests: tuple[str, ...], log: Path) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(copy), "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.call(
            # Slow or not: a named test must run (the last -m wins over addopts').
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
            + ["-m", "slow or not slow", *tests],
            cwd=copy,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return code, time.monotonic() - started


def failed_test(log: Path) -> str:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ")[1].split("::")[-1]
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--keep", action="store_true", help="keep the copies and logs")
    args = parser.parse_args()
    chosen = MUTATIONS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutations: {sorted(unknown)}")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:28s} {m.fault}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="mutation-check-"))
    rows: list[tuple[str, str, str, float]] = []
    ok = True
    try:
        for mutation in chosen:
            where = work / mutation.name
            where.mkdir()
            copy = make_copy(where)
            apply(copy, mutation)
            code, seconds = run_tests(copy, mutation.tests, where / "pytest.log")
            if code == 1:
                verdict, by = "caught", failed_test(where / "pytest.log")
            else:
                ok = False
                verdict = "NOT CAUGHT" if code == 0 else f"ERROR (pytest exit {code})"
                by = f"see {where / 'pytest.log'}"
            rows.append((mutation.name, verdict, by, seconds))
            print(f"{mutation.name:28s} {verdict:10s} {by} ({seconds:.0f} s)", flush=True)
            if code == 1:
                shutil.rmtree(copy)
        baseline = work / "baseline"
        baseline.mkdir()
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, seconds = run_tests(make_copy(baseline), tests, baseline / "pytest.log")
        base_ok = code == 0
        ok = ok and base_ok
        print(
            f"{'baseline (unmutated)':28s} {'passes' if base_ok else 'FAILS':10s} "
            f"{len(tests)} test selections ({seconds:.0f} s)"
        )
        print("\n| mutation | fault | result | caught by |\n|---|---|---|---|")
        faults = {m.name: m.fault for m in MUTATIONS}
        for name, verdict, by, _ in rows:
            print(f"| {name} | {faults[name]} | {verdict} | {by} |")
        print(f"\nRESULT: {'PASS' if ok else 'FAIL'} ({len(rows)} mutations)")
    finally:
        if not args.keep and ok:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

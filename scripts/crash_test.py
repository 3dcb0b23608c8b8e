"""Fault-injection harness: kill `python -m pipeline train` over and over, corrupt its newest
checkpoint, start it twice, and check it still ends exactly where an uninterrupted run ends.

    python scripts/crash_test.py --kills 50 --seed 0
    python scripts/crash_test.py --kills 20 -- model=mlp data.path=/data/mnist.npz fit.epochs=2

Everything after `--` is passed to `python -m pipeline train` (defaults: a small slice of the
bundled sample). Kills are SIGKILLs at random instants (drawn from --seed) and, for about half
of them, at named points inside the durable-write path (PIPELINE_FAILPOINT), so they land
inside checkpoint, data-cache, record and export writes. Every time the victim run finishes, it
is compared in full with the uninterrupted run (pipeline/exactness.py: every kept checkpoint and
its loop state, TensorBoard scalar values, test metrics, exported predictions; every damaged
checkpoint detected; no temporary debris) before a new victim takes the remaining kills. Exit
code 0 only if every victim, and so every kill, was verified.

Modes on faultfs (scripts/faultfs.py, a FUSE filesystem that can lose power and fail calls;
needs fuse3 and mfusepy, and stops with an error line where they are missing):

    python scripts/crash_test.py --power-cut --cuts 100 --seed 1     # kill + cut the power
    python scripts/crash_test.py --power-cut --cuts 20 --mutations fsync-dir,file-fsync,...
    python scripts/crash_test.py --disk-faults --faults 200 --seed 1  # EIO / ENOSPC
    python scripts/crash_test.py --readers --reads 200 --seed 1       # status/report/... meanwhile

--power-cut: at random instants and at the failpoints, SIGKILL the run's process group and cut
the power (everything not fsynced is lost; sometimes a random part of it is kept), sometimes
damage the newest checkpoint, and run the same command again. After every cut: no file under a
committed name is damaged, no committed checkpoint step or directory is lost (see
power_cut_campaign for the rule); every finished victim is compared in full as above.
--mutations runs that campaign on copies of the checkout with one fsync of durable.py removed
(scripts/mutation_check.py's edits) and passes only if each one is caught.
--disk-faults: each launch arms one failing call (write, fsync, create, rename, mkdir, open,
read, ...) on one part of the run (records, data, checkpoints, TensorBoard, SavedModel, Keras,
HDF5, TFLite, report, Hydra's files, the log); each must end in one `error:` line naming the
path, a non-zero exit, no traceback and no committed file that fails verification; every
victim then finishes without faults, bit-identical to the reference.
--readers: reads the run while it trains, checkpoints, evaluates and exports; no read may
crash or show a half-written state.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import checkpoint, durable, exactness, rundir, tblog
from pipeline.rundir import RunDir

DEFAULT_CONFIG = [
    "data=sample",
    "data.train_size=1000",
    "data.test_size=300",
    "fit.batch_size=50",
    "fit.epochs=3",
    "checkpoint.every_steps=4",
    "fit.log_every_steps=1",
]
FAILPOINTS = [
    "file_before_write",
    "file_after_write",
    "file_after_fsync",
    "file_after_rename",
    "dir_before_manifest",
    "dir_before_rename",
    "dir_after_rename",
    "export_before_publish",
]
STAGE_ORDER = list(rundir.STAGES)  # the stage registry's order (pipeline/stages.py)


def pipeline(args: list[str], outputs: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", *args, f"run.outputs={outputs}"],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_dir_of(outputs: Path) -> Path | None:
    runs = rundir.run_dirs_under(outputs)
    return runs[0] if runs else None


def stage_in_progress(run_dir: Path | None) -> str:
    """The first stage without a finished record: where the process was when it died."""
    if run_dir is None:
        return "startup"
    done = {p.stem for p in RunDir(run_dir).stages_dir.glob("*.json")}
    return next((s for s in STAGE_ORDER if s not in done), "done")


def wait_until_locked(outputs: Path, proc: subprocess.Popen, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        run_dir = run_dir_of(outputs)
        if run_dir is not None and rundir.is_running(run_dir):
            return True
        time.sleep(0.05)
    return False


def newest_checkpoint(run_dir: Path | None) -> Path | None:
    if run_dir is None:
        return None
    steps = sorted(RunDir(run_dir).checkpoints.glob("step-?????????"))
    return steps[-1] if steps else None


def corrupt(path: Path, rng: random.Random) -> str:
    state = path / "state.npz"
    kind = rng.choice(["flip", "truncate", "drop-manifest"])
    if kind == "flip":
        raw = bytearray(state.read_bytes())
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        state.write_bytes(bytes(raw))
    elif kind == "truncate":
        raw = state.read_bytes()
        state.write_bytes(raw[: rng.randrange(len(raw))])
    else:
        (path / "MANIFEST.json").unlink()
    return kind


def reference(config: list[str], workdir: Path) -> tuple[Path, float]:
    started = time.monotonic()
    proc = pipeline(config, workdir / "reference")
    output, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"the uninterrupted reference run failed:\n{output}")
    return run_dir_of(workdir / "reference"), time.monotonic() - started


@dataclass
class Victim:
    """One run that is killed again and again until it finishes, then compared in full."""

    number: int
    kills: int = 0
    corruptions: list[str] = field(default_factory=list)
    comparison: exactness.Comparison | None = None

    def set_aside(self, run_dir: Path | None) -> int:
        """Damaged checkpoints the pipeline detected and set aside so far."""
        if run_dir is None:
            return 0
        return len(list(RunDir(run_dir).checkpoints.glob("step-*.corrupt*")))


def verify(victim: Victim, ref_dir: Path, run_dir: Path | None) -> list[str]:
    """Everything that makes a finished victim differ from the uninterrupted run."""
    if run_dir is None:
        return ["the victim finished without a run directory"]
    victim.comparison = exactness.compare_runs(ref_dir, run_dir)
    problems = list(victim.comparison.differences)
    detected = victim.set_aside(run_dir)
    if detected != len(victim.corruptions):
        problems.append(
            f"{len(victim.corruptions)} checkpoints were damaged but {detected} were set aside: "
            "a damaged checkpoint was trusted or lost"
        )
    leftovers = debris(run_dir)
    if leftovers:
        problems.append(f"temporary files left over: {leftovers[:3]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to inject")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--corrupt-prob",
        type=float,
        default=0.15,
        help="chance of damaging the newest checkpoint after a kill (or cut)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("outputs/crash-test"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--power-cut", action="store_true", help="run on faultfs and cut the power at each kill"
    )
    mode.add_argument(
        "--disk-faults", action="store_true", help="run on faultfs and fail syscalls (EIO, ENOSPC)"
    )
    mode.add_argument(
        "--readers",
        action="store_true",
        help="read the run (status, report, predict, TensorBoard) in a loop while it trains",
    )
    parser.add_argument("--cuts", type=int, default=100, help="--power-cut: power cuts")
    parser.add_argument("--faults", type=int, default=200, help="--disk-faults: injected errors")
    parser.add_argument("--reads", type=int, default=200, help="--readers: reads at least")
    parser.add_argument(
        "--mutations",
        help="--power-cut: comma-separated names from scripts/mutation_check.py; run the "
        "campaign once on a copy with each, and pass only if every one is caught",
    )
    parser.add_argument(
        "--reference", type=Path, help="a finished uninterrupted run dir to compare with"
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="--disk-faults: report every failure, go on"
    )
    parser.add_argument("overrides", nargs="*", help="after --: overrides for train")
    args = parser.parse_args()
    config = args.overrides or DEFAULT_CONFIG
    if args.mutations:
        return mutation_campaigns(args, config)
    if args.power_cut:
        return power_cut_campaign(args, config)
    if args.disk_faults:
        return disk_fault_campaign(args, config)
    if args.readers:
        return reader_campaign(args, config)
    rng = random.Random(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for old in ("reference", "victim"):
        subprocess.run(["rm", "-rf", str(args.workdir / old)], check=True)

    print(f"reference run: train {' '.join(config)}", flush=True)
    ref_dir, ref_seconds = reference(config, args.workdir)
    print(f"  done in {ref_seconds:.1f}s: {ref_dir}", flush=True)

    victim_root = args.workdir / "victim"
    kills_by_stage: collections.Counter[str] = collections.Counter()
    kills_by_kind: collections.Counter[str] = collections.Counter()
    victims = [Victim(1)]
    resumes = redone_max = lock_refusals = launches = 0
    while True:
        victim = victims[-1]
        launches += 1
        env = {}
        kills = sum(kills_by_stage.values())
        if kills >= args.kills:
            kind = "none"  # enough kills: let it finish
        elif rng.random() < 0.5:
            kind = "failpoint"
            env["PIPELINE_FAILPOINT"] = f"{rng.choice(FAILPOINTS)}@{rng.randint(1, 4)}"
        else:
            kind = "timer"
        proc = pipeline(config, victim_root, env)
        if launches % 10 == 3 and kind != "none" and wait_until_locked(victim_root, proc):
            # A second process on the same run must be refused while the first holds it.
            second = pipeline(config, victim_root)
            second_out, _ = second.communicate()
            if second.returncode == 3 and "is in use by pid" in second_out:
                lock_refusals += 1
            elif proc.poll() is None:  # the first still holds the run: the second must not run
                print(f"FAIL: a second process was not refused:\n{second_out}")
                return 1
        stage = "startup"
        if kind == "timer":
            deadline = time.monotonic() + rng.uniform(0.5, ref_seconds)
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.poll() is None:
                stage = stage_in_progress(run_dir_of(victim_root))
                proc.kill()
        output, _ = proc.communicate()
        run_dir = run_dir_of(victim_root)
        session = this_session(run_dir, proc.pid)
        if "resumed_from" in session:
            resumes += 1
            redone_max = max(redone_max, session["redone_steps"])
        if proc.returncode == -signal.SIGKILL:
            if kind == "failpoint":
                stage = stage_in_progress(run_dir)
            victim.kills += 1
            kills_by_stage[stage] += 1
            kills_by_kind[kind if kind == "timer" else env["PIPELINE_FAILPOINT"].split("@")[0]] += 1
            newest = newest_checkpoint(run_dir)
            # One damaged checkpoint at a time, so each one's detection can be counted.
            outstanding = len(victim.corruptions) - victim.set_aside(run_dir)
            if newest is not None and not outstanding and rng.random() < args.corrupt_prob:
                victim.corruptions.append(f"{newest.name}:{corrupt(newest, rng)}")
        elif proc.returncode != 0:
            print(f"FAIL: run exited {proc.returncode}:\n{output[-3000:]}")
            return 1
        print(
            f"  launch {launches}: victim {victim.number} {kind:9s} exit {proc.returncode:4d}  "
            f"kills so far {sum(kills_by_stage.values())}",
            flush=True,
        )
        if proc.returncode != 0:
            continue
        # The victim finished: compare it in full before anything else happens to it.
        problems = verify(victim, ref_dir, run_dir)
        assert victim.comparison is not None or problems
        print(
            f"  victim {victim.number}: {victim.kills} kills, "
            f"{'verified' if not problems else 'DIFFERS'} "
            f"({victim.comparison.summary() if victim.comparison else 'nothing compared'})",
            flush=True,
        )
        if differs(victim, problems):
            return 1
        if sum(kills_by_stage.values()) >= args.kills:
            break
        subprocess.run(["rm", "-rf", str(victim_root)], check=True)
        victims.append(Victim(victim.number + 1))

    total_kills = sum(kills_by_stage.values())
    verified = sum(v.kills for v in victims if v.comparison is not None)
    corruptions = [c for v in victims for c in v.corruptions]
    run_dir = run_dir_of(victim_root)
    assert run_dir is not None
    metrics = RunDir(run_dir).read_metrics()
    print("\n== crash test summary ==")
    print(f"config: train {' '.join(config)}")
    print(f"kills injected: {total_kills} (by stage: {dict(sorted(kills_by_stage.items()))})")
    print(f"kills by kind: {dict(sorted(kills_by_kind.items()))}")
    print(
        f"launches: {launches}; fit resumes: {resumes}; second processes refused: {lock_refusals}"
    )
    print(
        f"victim runs: {len(victims)}, each compared in full with the uninterrupted run; kills "
        f"per run: {[v.kills for v in victims]}"
    )
    print(f"kills verified: {verified} of {total_kills}")
    # verify() failed any victim whose damaged checkpoints were not all set aside.
    print(f"checkpoints corrupted: {len(corruptions)}; detected and set aside: {len(corruptions)}")
    print(f"steps redone after a kill, at most: {redone_max} (checkpoint.every_steps bounds it)")
    print("temporary files left over: 0")
    print("final weights bit-identical: yes (every kept checkpoint, with its loop state)")
    print(f"test metrics identical: yes (accuracy {metrics['test_accuracy']:.4f})")
    print("exported predictions identical: yes")
    print("TensorBoard scalars identical: yes (values, each step once)")
    ok = verified == total_kills
    print(f"RESULT: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


# ================================================================================ faultfs modes
# --power-cut, --disk-faults and --readers run the victim with its run.outputs on a faultfs
# mount (scripts/faultfs.py): a FUSE filesystem that keeps, next to the live tree, the image a
# disk would still hold after a power cut, and that fails chosen syscalls on demand.

COMMITTED = re.compile(r"Committed (\S.*) \(pid (\d+)\)$", re.M)


def load_faultfs():  # noqa: ANN201 - the module, imported from beside this script
    """scripts/faultfs.py; stop loudly (never skip) if this machine cannot mount it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import faultfs

    missing = faultfs.missing_prerequisites()
    if missing:
        sys.exit(
            f"error: faultfs cannot run on this machine, missing: {', '.join(missing)}; "
            f"{faultfs.INSTALL_HINT}"
        )
    return faultfs


@dataclass
class Launch:
    """One `python -m pipeline ...` in its own session, output captured in files."""

    proc: subprocess.Popen
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill_tree(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def keep(self, name: str) -> Path:
        """Copy this launch's stdout and stderr aside (for a failure report)."""
        for path in (self.out, self.err):
            shutil.copyfile(path, path.with_name(f"{name}{path.suffix}"))
        return self.out.with_name(name)


def launch(
    args: list[str],
    logs: Path,
    env: dict[str, str] | None = None,
    command: str = "train",
) -> Launch:
    """Start the pipeline in a new session (so its whole process group can be SIGKILLed)."""
    full_env = {k: v for k, v in os.environ.items() if k != "PIPELINE_FAILPOINT"}
    full_env.update({"TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{command}.out", logs / f"{command}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", command, *args],
            env=full_env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
    return Launch(proc, out, err)


def committed_by(run_dir: Path | None, pid: int) -> list[Path]:
    """Directories whose durable.write_dir had returned in process `pid`, from the line it logs
    after each commit (pipeline.log, read from the live tree before the cut)."""
    if run_dir is None:
        return []
    try:
        text = RunDir(run_dir).log.read_text(errors="replace")
    except OSError:
        return []
    return [Path(m.group(1)) for m in COMMITTED.finditer(text) if int(m.group(2)) == pid]


def this_session(run_dir: Path | None, pid: int) -> dict[str, Any]:
    """The session record the launch with `pid` left (what fit resumed from, the steps it
    redid), or {} if that launch wrote none (killed before it started a session)."""
    if run_dir is None:
        return {}
    try:
        session = RunDir(run_dir).read_session() or {}
    except OSError:
        return {}
    return session if session.get("pid") == pid else {}


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(r"step-(\d{9})", path.name)
    return int(match.group(1)) if match and path.parent.name == rundir.CHECKPOINTS else None


def newest_verifying(run_dir: Path | None, skip: set[str]) -> int:
    """Step of the newest checkpoint that verifies (read only; 0 if none), ignoring `skip`."""
    if run_dir is None:
        return 0
    root = RunDir(run_dir).checkpoints
    for step in reversed(checkpoint.committed_steps(root)):
        path = checkpoint.path_for(root, step)
        if str(path) in skip:
            continue
        try:
            durable.verify_dir(path)
            return step
        except (durable.CorruptArtifact, OSError):
            continue
    return 0


def audit(run_dir: Path | None, skip: set[str]) -> list[str]:
    """Every file or directory under a committed name that does not verify (read only).

    Each one was written through pipeline/durable.py, so after a power cut each must be either
    absent or complete; `skip` holds the checkpoints the harness itself damaged."""
    if run_dir is None:
        return []
    problems: list[str] = []

    def check(path: Path, how: Callable[[Path], object]) -> None:
        if str(path) in skip or not path.exists():
            return
        try:
            how(path)
        except (durable.CorruptArtifact, OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{os.path.relpath(path, run_dir)}: {exc}")

    def npz(path: Path) -> None:
        with np.load(path) as arrays:
            for name in arrays.files:
                arrays[name]

    run = RunDir(run_dir)
    for path in sorted(run.checkpoints.glob("step-?????????")):
        check(path, durable.verify_dir)
    for path in shared_data(run_dir):  # every committed entry, also one no record names yet
        check(path, durable.verify_dir)
    for model in run.export_models():
        for version in run.export_versions(model):
            check(run.export_version(model, version), durable.verify_dir)
    for path in [run.run_record, run.session]:
        check(path, durable.read_record)
    for path in sorted(run.stages_dir.glob("*.json")):
        if durable.TMP_MARK not in path.name:
            check(path, durable.read_record)
    check(run.metrics, lambda p: json.loads(p.read_text()))
    check(run.predictions, npz)
    return problems


def set_aside(path: Path) -> int:
    """How many damaged copies of `path` the pipeline has set aside (`<name>.corrupt*`)."""
    return len(list(path.parent.glob(f"{path.name}.corrupt*")))


def differs(victim: Victim, problems: list[str]) -> bool:
    """Print how a finished victim differs from the uninterrupted run, if it does."""
    if problems:
        print(f"FAIL: victim {victim.number} differs from the uninterrupted run:")
        for problem in problems[:20]:
            print(f"  - {problem}")
    return bool(problems)


def shared_data(run_dir: Path) -> list[Path]:
    """The committed entries of the prepared-data cache beside the run (rundir.data_cache)."""
    cache = rundir.data_cache(run_dir.parent)
    return sorted(p for p in cache.glob("*") if p.is_dir() and "." not in p.name)


def debris(run_dir: Path) -> list[str]:
    cache = rundir.data_cache(run_dir.parent)
    found = [*run_dir.rglob(f"*{durable.TMP_MARK}*"), *cache.glob(f"*{durable.TMP_MARK}*")]
    return [str(p) for p in found]


class CampaignFailed(Exception):
    pass


def reference_for(args: argparse.Namespace, config: list[str]) -> tuple[Path, float]:
    """The uninterrupted run to compare with: --reference, or a fresh run on plain disk."""
    if args.reference is not None:
        if not RunDir(args.reference).run_record.exists():
            sys.exit(f"error: --reference {args.reference} is not a run directory")
        seconds = float(os.environ.get("CRASH_TEST_REFERENCE_SECONDS", "20"))
        print(f"reference run: {args.reference} (given)", flush=True)
        return args.reference, seconds
    subprocess.run(["rm", "-rf", str(args.workdir / "reference")], check=True)
    print(f"reference run: train {' '.join(config)}", flush=True)
    ref_dir, seconds = reference(config, args.workdir)
    print(f"  done in {seconds:.1f}s: {ref_dir}", flush=True)
    return ref_dir, seconds


def mount(faultfs, where: Path):  # noqa: ANN001, ANN201 - faultfs module, FaultFS
    subprocess.run(["rm", "-rf", str(where)], check=True)
    fs = faultfs.FaultFS(where / "backing", where / "mnt", state=where / "state")
    fs.start()
    return fs


def fresh_victim(fs) -> Path:  # noqa: ANN001 - a FaultFS
    """An empty outputs directory on the mount, durable (so no cut brings an old run back)."""
    outputs = fs.mount / "outputs"
    subprocess.run(["rm", "-rf", str(outputs)], check=True)
    outputs.mkdir()
    fs.sync()
    return outputs


def verify_finished(
    ref_dir: Path, run_dir: Path | None, corruptions: int
) -> tuple[exactness.Comparison | None, list[str]]:
    """Everything that makes a finished victim differ from the uninterrupted run."""
    if run_dir is None:
        return None, ["the victim finished without a run directory"]
    comparison = exactness.compare_runs(ref_dir, run_dir)
    problems = list(comparison.differences)
    detected = len(list(RunDir(run_dir).checkpoints.glob("step-*.corrupt*")))
    if detected != corruptions:
        problems.append(
            f"{corruptions} checkpoints were damaged by the harness but {detected} were set "
            "aside: a damaged checkpoint was trusted, or a sound one was set aside"
        )
    leftovers = debris(run_dir)
    if leftovers:
        problems.append(f"temporary files left over: {leftovers[:3]}")
    return comparison, problems


def power_cut_campaign(args: argparse.Namespace, config: list[str]) -> int:
    """SIGKILL the run and cut the power, over and over; see README "Crash-test it yourself".

    The rule for "no committed step lost": durable.write_dir logs "Committed <dir> (pid P)"
    to pipeline.log after the commit returned (the rename and the fsync of the parent
    directory are done). Before each cut the harness reads the live pipeline.log; the newest
    checkpoint step named there by the killed process is committed, and after the cut the
    newest checkpoint that verifies must be at least that step (and the next fit must resume
    from at least that step). Every other committed directory named there (data cache, export
    versions) must still exist and verify. A commit cut short before its log line is not
    counted (the harness cannot know it returned): the rule never asks for more than was
    promised. When the harness damages the newest checkpoint itself, the promise moves back to
    the newest one that still verifies.
    """
    faultfs = load_faultfs()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # compare_runs loads SavedModels here
    rng = random.Random(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ref_dir, ref_seconds = reference_for(args, config)
    fs = mount(faultfs, args.workdir / "powercut")
    logs = args.workdir / "powercut-logs"
    stats: dict[str, collections.Counter] = {
        k: collections.Counter() for k in ("stage", "moment", "pending", "kind")
    }
    totals = collections.Counter()
    try:
        outputs = fresh_victim(fs)
        victim = Victim(1)
        victims = [victim]
        committed_step = 0  # newest checkpoint step whose commit returned before a cut
        committed_dirs: set[str] = set()  # other directories whose commit returned
        # Checkpoints the harness damaged -> how many copies of that name were set aside then;
        # one is outstanding until the pipeline sets it aside (it may commit that step again).
        damaged_by_us: dict[str, int] = {}
        cuts = launches = 0
        moment = "none"

        def fail(why: str) -> int:
            print(f"FAIL at cut {cuts} (last cut: {moment}): {why}", flush=True)
            return 1

        while True:
            launches += 1
            env: dict[str, str] = {}
            if cuts >= args.cuts:
                kind = "none"
            elif rng.random() < 0.5:
                kind = "failpoint"
                point = rng.choice(FAILPOINTS)
                # A session passes each file point a few times, each dir point once per
                # checkpoint (fit) or once (data, export), export_before_publish once.
                hits = {"file": 4, "dir": 3, "export": 1}[point.split("_")[0]]
                env["PIPELINE_FAILPOINT"] = f"{point}@{rng.randint(1, hits)}:kill"
            else:
                kind = "timer"
            promised = committed_step
            run = launch([*config, f"run.outputs={outputs}"], logs, env)
            if kind == "timer":
                deadline = time.monotonic() + rng.uniform(0.5, 0.9 * ref_seconds)
                while run.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            run.kill_tree() if kind == "timer" else run.proc.wait()
            output = run.output()
            run_dir = run_dir_of(outputs)
            session = this_session(run_dir, run.proc.pid)  # the live tree, before any cut
            if "resumed_from" in session:
                totals["resumes"] += 1
                if session["resumed_from"] < promised:
                    return fail(
                        f"fit resumed from step {session['resumed_from']}, but step {promised} "
                        "had been committed before the cut: a committed step was lost"
                    )
                totals["redone_max"] = max(totals["redone_max"], session["redone_steps"])
            code = run.proc.returncode
            if code == 0:
                comparison, problems = verify_finished(ref_dir, run_dir, len(victim.corruptions))
                victim.comparison = comparison
                print(
                    f"  launch {launches}: victim {victim.number} finished after {victim.kills} "
                    f"cuts: {'verified' if not problems else 'DIFFERS'} "
                    f"({comparison.summary() if comparison else 'nothing compared'})",
                    flush=True,
                )
                if problems:
                    return fail(
                        f"victim {victim.number} differs from the uninterrupted run:\n  - "
                        + "\n  - ".join(problems[:20])
                    )
                if cuts >= args.cuts:
                    assert run_dir is not None
                    metrics = RunDir(run_dir).read_metrics()
                    break
                outputs = fresh_victim(fs)
                victim = Victim(victim.number + 1)
                victims.append(victim)
                committed_step, committed_dirs, damaged_by_us = 0, set(), {}
                continue
            if code != -signal.SIGKILL:
                return fail(f"the run exited {code} after the cut:\n{output[-3000:]}")
            # Killed (by the timer or at its failpoint): this is the moment of the power cut.
            fs.kill_users()
            stage = stage_in_progress(run_dir)
            moment = "timer" if kind == "timer" else env["PIPELINE_FAILPOINT"].split("@")[0]
            for path in committed_by(run_dir, run.pid):
                step = checkpoint_step(path)
                if step is not None:
                    committed_step = max(committed_step, step)
                else:
                    committed_dirs.add(str(path))
            seed = rng.randrange(1 << 30) if rng.random() < 0.5 else None
            summary = fs.cut(seed=seed, keep=rng.uniform(0.2, 0.8))
            cuts += 1
            victim.kills += 1
            stats["stage"][stage] += 1
            stats["moment"][moment] += 1
            stats["kind"]["seeded" if seed is not None else "drop-all"] += 1
            for key in ("dropped_data", "kept_data", "dropped_dirs", "kept_dirs"):
                stats["pending"][key] += len(summary[key])
            how = f"seed {seed}" if seed is not None else "all pending dropped"
            moment = f"{moment} in {stage}, {how}"
            # What the disk holds now must keep every promise made before the cut.
            run_dir = run_dir_of(outputs)
            damaged_by_us = {p: n for p, n in damaged_by_us.items() if set_aside(Path(p)) <= n}
            skip = set(damaged_by_us)
            damaged = audit(run_dir, skip)
            if damaged:
                return fail(
                    "a committed file is damaged after the cut (the pipeline would have to "
                    "detect it; a durable write never leaves one):\n  - " + "\n  - ".join(damaged)
                )
            newest = newest_verifying(run_dir, skip)
            if newest < committed_step:
                return fail(
                    f"committed step lost: checkpoint step {committed_step} was committed "
                    f"before the cut, the newest that verifies after it is step {newest}"
                )
            lost = sorted(d for d in committed_dirs if not Path(d).exists())
            if lost:
                return fail(f"committed directories lost in the cut: {lost}")
            totals["steps_behind_max"] = max(totals["steps_behind_max"], newest - committed_step)
            print(
                f"  cut {cuts:3d}: {moment}; pending dropped {len(summary['dropped_data'])} data, "
                f"{len(summary['dropped_dirs'])} dirs; committed step {committed_step}, "
                f"newest verifying {newest}",
                flush=True,
            )
            committed_step = newest  # what the disk now promises (at least the old promise)
            newest_dir = newest_checkpoint(run_dir)
            if newest_dir is not None and not skip and rng.random() < args.corrupt_prob:
                victim.corruptions.append(f"{newest_dir.name}:{corrupt(newest_dir, rng)}")
                damaged_by_us[str(newest_dir)] = set_aside(newest_dir)
                fs.sync()  # the damage is on the disk, as a bad sector would be
                committed_step = newest_verifying(run_dir, set(damaged_by_us))
    except CampaignFailed as exc:
        print(f"FAIL: {exc}")
        return 1
    finally:
        fs.unmount()

    corruptions = [c for v in victims for c in v.corruptions]
    verified = sum(v.kills for v in victims if v.comparison is not None)
    pending = stats["pending"]
    print("\n== power-cut test summary ==")
    print(f"config: train {' '.join(config)} (run.outputs on faultfs, strict model)")
    print(f"cuts: {cuts} (by stage: {dict(sorted(stats['stage'].items()))})")
    print(f"cuts by moment: {dict(sorted(stats['moment'].items()))}")
    print(
        f"cuts dropping every pending operation: {stats['kind']['drop-all']}; seeded "
        f"(each pending operation kept or dropped at random): {stats['kind']['seeded']}"
    )
    print(
        f"pending operations at the cuts: file data dropped {pending['dropped_data']}, kept "
        f"{pending['kept_data']}; directory changes dropped {pending['dropped_dirs']}, kept "
        f"{pending['kept_dirs']}"
    )
    print(f"launches: {launches}; fit resumes: {totals['resumes']} (none below a committed step)")
    print(
        f"victim runs: {len(victims)}, each compared in full with the uninterrupted run; cuts "
        f"per run: {[v.kills for v in victims]}"
    )
    print(f"cuts verified: {verified} of {cuts}")
    print(f"checkpoints corrupted: {len(corruptions)}; detected and set aside: {len(corruptions)}")
    print("damaged files under a committed name after a cut: 0 (every one audited)")
    print("committed steps lost: 0; committed directories lost: 0")
    print(f"steps redone after a cut, at most: {totals['redone_max']}")
    print("temporary files left over: 0")
    print("final weights bit-identical: yes (every kept checkpoint, with its loop state)")
    print(f"test metrics identical: yes (accuracy {metrics['test_accuracy']:.4f})")
    print("exported predictions identical: yes")
    print("TensorBoard scalars identical: yes (values, each step once)")
    ok = verified == cuts
    print(f"RESULT: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


# Where the failing-disk campaign aims (regex on the path inside the mount), and from which
# stage on a launch reaches it. Errors in TensorFlow's own writers (SavedModel, Keras, HDF5,
# TFLite) and in TensorBoard event files are aimed at on purpose.
FAULT_AREAS = {
    "anywhere": (r"^/outputs/", "startup"),
    "hydra": (r"/\.hydra/", "startup"),
    "log": (r"/pipeline\.log$", "startup"),
    "records": (r"/(run|session)\.|/stages/", "startup"),
    "data": (r"/\.?data([./]|$)", "data"),
    "summary": (r"model_summary", "model"),
    "checkpoints": (r"/checkpoints/", "fit"),
    "tensorboard": (r"/tensorboard(/|$)", "fit"),
    "evaluate": (r"/\.?(predictions|metrics)\.", "evaluate"),
    "savedmodel": (r"/export/.*/(saved_model\.pb|fingerprint\.pb|variables|assets)", "export"),
    "keras": (r"/export/.*model(\.tmp-\d+)?\.keras", "export"),
    "h5": (r"/export/.*\.h5$", "export"),
    "tflite": (r"/export/.*\.tflite$", "export"),
    "export": (r"/export/", "export"),
    "report": (r"/\.?report", "done"),
}
TF_AREAS = ("savedmodel", "keras", "h5", "tflite", "tensorboard")
# TensorFlow 2.21 itself crashes (SIGSEGV in CreateFingerprintDef, called from
# tensorflow/python/saved_model/fingerprinting_utils.py:write_fingerprint) when a read of the
# SavedModel it has just written fails; no caller can turn that into an error message. Read
# errors on a SavedModel being written are left out (its writes, and reads of published ones,
# are not). On a real disk those reads come from the page cache the write just filled.
TF_CRASHES = {"read": r"/export/[^/]+/\.\d+\.tmp-\d+/(variables|saved_model\.pb|fingerprint\.pb)"}
FAULT_OPS = {
    "write": ("EIO", "ENOSPC"),
    "create": ("EIO", "ENOSPC"),
    "mkdir": ("EIO", "ENOSPC"),
    "rename": ("EIO", "ENOSPC"),
    "fsync": ("EIO", "ENOSPC"),
    "fsyncdir": ("EIO",),
    "open": ("EIO",),
    "read": ("EIO",),
    "unlink": ("EIO",),
    "truncate": ("EIO", "ENOSPC"),
    "flush": ("EIO",),
}
# The calls each area sees (an op armed on an area that never sees it would go unused).
_FILE_OPS = ("create", "write", "flush", "fsync", "open", "rename", "read")
_DIR_OPS = (*_FILE_OPS, "mkdir", "fsyncdir", "unlink")
AREA_OPS = {
    "anywhere": tuple(FAULT_OPS),
    "hydra": ("create", "open", "write", "flush", "truncate"),
    "log": ("create", "open", "write", "flush"),
    "records": _FILE_OPS,
    "summary": _FILE_OPS,
    "evaluate": _FILE_OPS,
    "report": _FILE_OPS,
    "tflite": _FILE_OPS,
    "keras": _FILE_OPS,
    "h5": _FILE_OPS,
    "data": _DIR_OPS,
    "checkpoints": (*_DIR_OPS, "rmdir"),
    "tensorboard": (*_FILE_OPS, "fsyncdir"),
    "savedmodel": _DIR_OPS,
    "export": _DIR_OPS,
}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|--- Logging error ---")


# Failed calls a run may survive with exit 0, by design: removing temporaries (a killed or
# failed write's debris, TensorFlow's own variables_temp) is retried by the next run, which
# the harness checks leaves no debris.
TOLERATED_OPS = ("unlink", "rmdir")


def check_failure(run: Launch, code: int, mount: Path, op: str) -> list[str]:
    """A launch that met an injected error: one clear `error:` line naming a path on the
    disk, a non-zero exit, no traceback (or, for a failed cleanup, a normal finish)."""
    problems = []
    stderr = run.err.read_text(errors="replace")
    if code == 0 and op in TOLERATED_OPS:
        return ["a Python traceback was printed"] if TRACEBACK.search(stderr) else []
    if code == 0:
        problems.append("exit code 0 after an injected error (the error was swallowed)")
    elif code < 0:
        problems.append(f"killed by signal {-code}")
    if TRACEBACK.search(stderr) or TRACEBACK.search(run.out.read_text(errors="replace")):
        problems.append("a Python traceback was printed")
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} `error:` lines on stderr, not one")
    elif str(mount) not in errors[0]:
        problems.append("the error line names no path on the disk")
    if "unexpected" in stderr:
        problems.append("reported as an unexpected error (a bug)")
    return problems


def disk_fault_campaign(args: argparse.Namespace, config: list[str]) -> int:
    """Fail syscalls of the run with EIO and ENOSPC, one armed per launch, over and over.

    Each launch arms one faultfs rule: an operation (write, fsync, create, rename, mkdir, open,
    read, unlink, ...) on paths of one area (records, data cache, checkpoints, TensorBoard,
    SavedModel, Keras, HDF5, TFLite, report, Hydra's files, the log, or anywhere), failing at
    a random matching call. A launch that meets its error must end with one `error:` line
    naming the path and a non-zero exit, never a traceback, and leave no committed file that
    fails verification. Every victim ends with a launch without faults, which must finish
    bit-identical to the uninterrupted run.
    """
    faultfs = load_faultfs()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rng = random.Random(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    fs = mount(faultfs, args.workdir / "diskfaults")
    logs = args.workdir / "diskfaults-logs"
    counts: dict[str, collections.Counter] = {
        k: collections.Counter() for k in ("stage", "op", "errno", "area", "exit")
    }
    examples: dict[str, str] = {}
    launches = injected = clean_failures = tolerated = 0
    victims: list[Victim] = []
    try:
        if args.reference is not None:
            ref_dir, _ = reference_for(args, config)
            op_calls = collections.Counter({op: 200 for op in FAULT_OPS})
        else:
            print(f"reference run (on the mount, no faults): train {' '.join(config)}", flush=True)
            before = collections.Counter(fs.stats()["ops"])
            ref_outputs = fs.mount / "reference"
            started = time.monotonic()
            ref = launch([*config, f"run.outputs={ref_outputs}"], logs)
            if ref.proc.wait() != 0:
                sys.exit(f"the uninterrupted reference run failed:\n{ref.output()[-3000:]}")
            op_calls = collections.Counter(fs.stats()["ops"]) - before
            ref_dir = run_dir_of(ref_outputs)
            assert ref_dir is not None
            print(f"  done in {time.monotonic() - started:.1f}s: {ref_dir}", flush=True)
            print(f"  calls it made: {dict(sorted(op_calls.items()))}", flush=True)
        outputs = fresh_victim(fs)
        victim = Victim(1)
        victims.append(victim)
        budget = rng.randint(3, 12)  # faulted launches before this victim's clean rerun
        while True:
            launches += 1
            run_dir = run_dir_of(outputs)
            stage = stage_in_progress(run_dir)
            fs.clear_faults()
            armed = None
            if injected < args.faults and victim.kills < budget:
                reach = ["startup", *STAGE_ORDER, "done"]
                areas = [
                    name
                    for name, (_, first) in FAULT_AREAS.items()
                    if reach.index(first) >= reach.index(stage if stage in reach else "startup")
                    or first == "startup"
                ]
                area = "anywhere" if rng.random() < 0.25 else rng.choice(areas)
                op = rng.choice(AREA_OPS[area])
                code_name = rng.choice(FAULT_OPS.get(op, ("EIO",)))
                calls = max(1, op_calls[op] // 4) if area == "anywhere" else 3
                nth = rng.randint(1, calls)
                # From the nth call on, every matching call fails: a bad disk stays bad (and a
                # single failed read would be retried by the kernel, unseen by the program).
                pattern = FAULT_AREAS[area][0].lstrip("^")
                if op in TF_CRASHES:
                    pattern = f"^(?!.*{TF_CRASHES[op]}).*{pattern}"
                fs.fault(op, "re:" + pattern, code_name, nth=nth, every=True)
                armed = (area, op, code_name, nth)
            run = launch([*config, f"run.outputs={outputs}"], logs)
            try:
                code = run.proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                run.kill_tree()
                print("FAIL: a launch hung for 15 minutes (a fault made it wait forever)")
                return 1
            stats = fs.stats()
            fs.clear_faults()  # before the harness itself reads the disk
            hit = bool(stats["faults"]) and stats["faults"][0]["injected"] > 0
            run_dir = run_dir_of(outputs)
            if hit:
                assert armed is not None
                area, op, code_name, nth = armed
                event = [e for e in stats["log"] if e["ev"] == "fault"][-1]
                failed_stage = stage_in_progress(run_dir)
                injected += 1
                victim.kills += 1
                counts["stage"][failed_stage] += 1
                counts["op"][op] += 1
                counts["errno"][code_name] += 1
                counts["area"][area] += 1
                counts["exit"][code] += 1
                problems = check_failure(run, code, fs.mount, op)
                problems += [f"after the error: {d}" for d in audit(run_dir, set())]
                error_line = next(
                    (x for x in run.err.read_text().splitlines() if x.startswith("error: ")), ""
                )
                print(
                    f"  fault {injected:3d}: {code_name} on {op} #{nth} of {area} "
                    f"({event['path'].rsplit('/', 2)[-2:]}) in {failed_stage}: exit {code}: "
                    f"{error_line[:150]}",
                    flush=True,
                )
                if problems:
                    print(
                        f"FAIL at fault {injected} ({code_name} on {op} of {event['path']} in "
                        f"{failed_stage}):\n  - " + "\n  - ".join(problems)
                    )
                    print(f"stderr:\n{run.err.read_text(errors='replace')[-4000:]}")
                    print(f"stdout and stderr kept in {run.keep(f'fault-{injected}')}.*")
                    if not args.keep_going:
                        return 1
                    continue
                clean_failures += 1
                tolerated += code == 0
                examples.setdefault(area, error_line)
                continue
            if code != 0:
                print(f"FAIL: a launch without an injected error exited {code}:\n")
                print(run.output()[-4000:])
                return 1
            # Finished without meeting a fault: the victim is done; compare it in full.
            comparison, problems = verify_finished(ref_dir, run_dir, 0)
            victim.comparison = comparison
            print(
                f"  launch {launches}: victim {victim.number} finished after {victim.kills} "
                f"errors: {'verified' if not problems else 'DIFFERS'}",
                flush=True,
            )
            if differs(victim, problems):
                return 1
            if injected >= args.faults:
                assert run_dir is not None
                metrics = RunDir(run_dir).read_metrics()
                break
            outputs = fresh_victim(fs)
            victim = Victim(victim.number + 1)
            victims.append(victim)
            budget = rng.randint(3, 12)
    finally:
        fs.unmount()

    tf_errors = sum(counts["area"][a] for a in TF_AREAS)
    print("\n== failing-disk test summary ==")
    print(f"config: train {' '.join(config)} (run.outputs on faultfs)")
    print(f"errors injected: {injected} (by stage: {dict(sorted(counts['stage'].items()))})")
    print(f"by call: {dict(sorted(counts['op'].items()))}")
    print(f"by errno: {dict(sorted(counts['errno'].items()))}")
    print(f"by target: {dict(sorted(counts['area'].items()))}")
    print(f"inside TensorFlow's, Keras' and TensorBoard's own writes: {tf_errors}")
    print(f"exit codes: {dict(sorted(counts['exit'].items()))}")
    print(
        f"launches: {launches}; each error ended in one `error:` line naming the path, a "
        f"non-zero exit and no traceback: {clean_failures - tolerated} of {injected}; failed "
        f"removals of temporaries finished normally (the next run removed the debris): "
        f"{tolerated}"
    )
    print("committed files failing verification after an error: 0 (every one audited)")
    print(
        f"victim runs: {len(victims)}, each finished by a rerun without faults and compared in "
        f"full with the uninterrupted run; errors per run: {[v.kills for v in victims]}"
    )
    print(f"test metrics identical: yes (accuracy {metrics['test_accuracy']:.4f})")
    print("final weights, exported predictions, TensorBoard scalars identical: yes")
    for area, line in sorted(examples.items()):
        print(f"  e.g. {area}: {line[:160]}")
    ok = clean_failures == injected and all(v.comparison is not None for v in victims)
    print(f"RESULT: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


# Non-zero exits a reader may end with, documented in the README: one line, exit code 2.
READER_REFUSALS = {
    "predict": ("has no export", "no run at", "no prepared data"),
    "report": ("no runs yet", "no run at"),
}
# Reader -> weight: predict imports TensorFlow (seconds), so it is drawn least often.
READERS = {"status": 5, "status --json": 5, "tensorboard": 5, "report": 3, "predict": 2}


def reader_campaign(args: argparse.Namespace, config: list[str]) -> int:
    """`status`, `status --json`, `report`, `predict --test-index 0` and TensorBoard's
    loader (train/, validation/, the evaluation), over and over while runs train, checkpoint,
    evaluate and export.

    Every read must end with exit 0 or one documented refusal (e.g. "has no export" before
    the first export), never a traceback, and never show a half-written state: status --json
    parses, and its step and finished stages, and TensorBoard's newest step, never go back.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rng = random.Random(args.seed)
    root = args.workdir / "readers"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    logs = root / "logs"
    reads: collections.Counter[str] = collections.Counter()
    by_stage: collections.Counter[str] = collections.Counter()
    refusals: collections.Counter[str] = collections.Counter()
    runs = 0
    while sum(reads.values()) < args.reads:
        runs += 1
        outputs = (root / f"run{runs}").absolute()
        train = launch([*config, f"run.outputs={outputs}"], logs / "train")
        newest: dict[str, int] = {}  # status step, stages done, TensorBoard step: never back
        while train.proc.poll() is None or not newest.get("finished"):
            finished = train.proc.poll() is not None
            run_dir = run_dir_of(outputs)
            stage = stage_in_progress(run_dir)
            kind = rng.choices(list(READERS), weights=list(READERS.values()))[0]
            reads[kind] += 1
            by_stage[stage] += 1
            problem = None
            if kind == "tensorboard":
                if run_dir is None or not RunDir(run_dir).tensorboard.is_dir():
                    continue
                try:
                    found = tblog.scalars(RunDir(run_dir).tensorboard)  # TensorBoard's loader
                    steps = {t: [step for step, _ in v] for t, v in found.items()}
                except Exception as exc:  # noqa: BLE001 - any failure of the loader is one
                    problem = f"TensorBoard's loader failed: {type(exc).__name__}: {exc}"
                else:
                    dup = [t for t, v in steps.items() if len(v) != len(set(v))]
                    top = max((max(v) for v in steps.values() if v), default=0)
                    if dup:
                        problem = f"TensorBoard shows a step twice in {dup}"
                    elif top < newest.get("tb", 0):
                        problem = f"TensorBoard's newest step went back to {top}"
                    newest["tb"] = max(top, newest.get("tb", 0))
            else:
                words = kind.split()
                extra = ["--test-index", "0", *config] if kind == "predict" else []
                if kind != "predict":
                    extra = ["run.name=" + run_dir.name] if run_dir is not None else []
                reader = launch(
                    [*words[1:], *extra, f"run.outputs={outputs}"], logs / "read", command=words[0]
                )
                code = reader.proc.wait()
                out = reader.out.read_text(errors="replace")
                err = reader.err.read_text(errors="replace")
                allowed = READER_REFUSALS.get(words[0], ())
                if TRACEBACK.search(out + err):
                    problem = f"`{kind}` printed a traceback:\n{err[-3000:]}"
                elif code != 0 and not (
                    code == 2
                    and len(err.strip().splitlines()) == 1
                    and any(a in err for a in allowed)
                ):
                    problem = f"`{kind}` exited {code}:\n{(out + err)[-3000:]}"
                elif code != 0:
                    refusals[f"{kind}: {next(a for a in allowed if a in err)}"] += 1
                elif kind == "status --json":
                    try:
                        rows = json.loads(out)
                    except ValueError as exc:
                        problem = f"status --json printed no JSON ({exc}):\n{out[:2000]}"
                    else:
                        for row in rows:
                            step, done = row.get("step") or 0, len(row.get("stages_done", []))
                            if step < newest.get("step", 0) or done < newest.get("stages", 0):
                                problem = f"status went back: {row}"
                            newest["step"] = max(step, newest.get("step", 0))
                            newest["stages"] = max(done, newest.get("stages", 0))
            if problem:
                train.kill_tree()
                print(f"FAIL at read {sum(reads.values())} ({kind}, during {stage}): {problem}")
                return 1
            total = sum(reads.values())
            if total % 20 == 0:
                print(f"  reads: {total} (run {runs}, now in {stage})", flush=True)
            if finished:
                newest["finished"] = 1
        if train.proc.returncode != 0:
            print(
                f"FAIL: the training run exited {train.proc.returncode}:\n{train.output()[-3000:]}"
            )
            return 1
    print("\n== readers test summary ==")
    print(f"config: train {' '.join(config)}; {runs} runs, read while they ran")
    print(f"reads: {sum(reads.values())} (by reader: {dict(sorted(reads.items()))})")
    print(f"reads by stage of the run: {dict(sorted(by_stage.items()))}")
    print(f"documented refusals (exit 2, one line): {dict(sorted(refusals.items()))}")
    print("crashes or tracebacks: 0; half-written states seen: 0 (status --json parsed every time,")
    print("  its step and finished stages and TensorBoard's newest step never went back)")
    print("RESULT: PASS")
    return 0


def mutation_campaigns(args: argparse.Namespace, config: list[str]) -> int:
    """--power-cut on copies of the checkout with one fsync of durable.py removed each (the
    edits of scripts/mutation_check.py): every one must make the campaign fail."""
    import tempfile

    import mutation_check

    load_faultfs()
    names = args.mutations.split(",")
    chosen = [m for m in mutation_check.MUTATIONS if m.name in names]
    unknown = set(names) - {m.name for m in chosen}
    if unknown:
        sys.exit(f"error: unknown mutations {sorted(unknown)}; see scripts/mutation_check.py")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ref_dir, ref_seconds = reference_for(args, config)
    work = Path(tempfile.mkdtemp(prefix="powercut-mutations-"))
    rows = []
    try:
        for mutation in chosen:
            copy = mutation_check.make_copy(work / mutation.name)
            mutation_check.apply(copy, mutation)
            started = time.monotonic()
            done = subprocess.run(
                [
                    sys.executable,
                    str(copy / "scripts" / "crash_test.py"),
                    "--power-cut",
                    f"--cuts={args.cuts}",
                    f"--seed={args.seed}",
                    f"--corrupt-prob={args.corrupt_prob}",
                    f"--workdir={(args.workdir / ('mutation-' + mutation.name)).absolute()}",
                    f"--reference={ref_dir.absolute()}",
                    "--",
                    *config,
                ],
                env={
                    **os.environ,
                    "PYTHONPATH": str(copy),
                    "CRASH_TEST_REFERENCE_SECONDS": f"{ref_seconds:.1f}",
                },
                capture_output=True,
                text=True,
                cwd=copy,  # `python -m pipeline` puts the cwd first on sys.path
            )
            seconds = time.monotonic() - started
            found = re.search(
                r"^FAIL at cut (\d+) \(last cut: (.*?)\): (.*(?:\n  - .*)*)", done.stdout, re.M
            )
            if done.returncode == 1 and found:
                cut, moment = found.group(1), found.group(2)
                why = found.group(3).replace("\n  - ", " / ")
                rows.append((mutation.name, mutation.fault, f"cut {cut}", moment, why))
            else:
                tail = (done.stdout + done.stderr)[-2000:]
                rows.append((mutation.name, mutation.fault, "NOT CAUGHT", "-", tail))
            print(
                f"{mutation.name:20s} {rows[-1][2]:11s} ({seconds:.0f} s) {rows[-1][3]}", flush=True
            )
            shutil.rmtree(work / mutation.name, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| removed fsync | caught at | the cut | what the harness found |\n|---|---|---|---|")
    for name, fault, where, moment, why in rows:
        print(f"| {name}: {fault} | {where} | {moment} | {why} |")
    ok = all(row[2] != "NOT CAUGHT" for row in rows)
    print(f"RESULT: {'PASS' if ok else 'FAIL'} ({len(rows)} mutations, --cuts {args.cuts})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

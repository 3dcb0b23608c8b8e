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
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import durable, exactness, rundir

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
STAGE_ORDER = ["data", "model", "fit", "evaluate", "export"]


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
    runs = [p.parent for p in outputs.glob("*/run.json")]
    return runs[0] if runs else None


def stage_in_progress(run_dir: Path | None) -> str:
    """The first stage without a finished record: where the process was when it died."""
    if run_dir is None:
        return "startup"
    done = {p.stem for p in (run_dir / "stages").glob("*.json")}
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
    steps = sorted((run_dir / "checkpoints").glob("step-?????????"))
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
        return len(list((run_dir / "checkpoints").glob("step-*.corrupt*")))


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
    leftovers = [str(p) for p in run_dir.rglob(f"*{durable.TMP_MARK}*")]
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
        help="chance of damaging the newest checkpoint after a kill",
    )
    parser.add_argument("--workdir", type=Path, default=Path("outputs/crash-test"))
    parser.add_argument("overrides", nargs="*", help="after --: overrides for train")
    args = parser.parse_args()
    config = args.overrides or DEFAULT_CONFIG
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
        resumes += output.count("Fit: resuming from")
        for match in re.finditer(r"had reached step \d+; (\d+) steps are redone", output):
            redone_max = max(redone_max, int(match.group(1)))
        run_dir = run_dir_of(victim_root)
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
        if problems:
            print(f"FAIL: victim {victim.number} differs from the uninterrupted run:")
            for problem in problems[:20]:
                print(f"  - {problem}")
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
    metrics = json.loads((run_dir / "metrics.json").read_text())
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


if __name__ == "__main__":
    sys.exit(main())

"""Fault-injection harness: kill `python -m pipeline train` over and over, corrupt its newest
checkpoint, start it twice, and check it still ends exactly where an uninterrupted run ends.

    python scripts/crash_test.py --kills 50 --seed 0
    python scripts/crash_test.py --kills 20 -- model=mlp data.path=/data/mnist.npz fit.epochs=2

Everything after `--` is passed to `python -m pipeline train` (defaults: a small slice of the
bundled sample). Kills are SIGKILLs at random instants (drawn from --seed) and, for about half
of them, at named points inside the durable-write path (PIPELINE_FAILPOINT), so they land
inside checkpoint, data-cache, record and export writes. Exit code 0 only if the final weights,
test metrics and exported predictions are identical to the uninterrupted run's.
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
from pathlib import Path

import numpy as np

from pipeline import rundir

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


def final_state(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(newest_checkpoint(run_dir) / "state.npz") as npz:
        return {k: npz[k] for k in npz.files}


def export_predictions(run_dir: Path) -> np.ndarray:
    """Probabilities of the newest exported SavedModel on the run's own test images."""
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "x = np.load(sys.argv[2])['x_test'][:200]\n"
        "np.save(sys.argv[3], m.signatures['serving_default'](image=tf.constant(x))"
        "['probabilities'].numpy())\n"
    )
    version = max((run_dir / "export" / "mnist").iterdir(), key=lambda p: int(p.name))
    out = run_dir / "predictions.npy"
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(version),
            str(run_dir / "data" / "prepared.npz"),
            str(out),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return np.load(out)


def reference(config: list[str], workdir: Path) -> tuple[Path, float]:
    started = time.monotonic()
    proc = pipeline(config, workdir / "reference")
    output, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"the uninterrupted reference run failed:\n{output}")
    return run_dir_of(workdir / "reference"), time.monotonic() - started


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

    victim = args.workdir / "victim"
    kills_by_stage: collections.Counter[str] = collections.Counter()
    kills_by_kind: collections.Counter[str] = collections.Counter()
    corruptions: list[str] = []
    resumes = detected = redone_max = lock_refusals = launches = 0
    finished = False
    while not finished:
        launches += 1
        run_dir = run_dir_of(victim)
        env = {}
        kind = "none"
        if len(kills_by_stage) and sum(kills_by_stage.values()) >= args.kills:
            kind = "none"  # enough kills: let it finish
        elif rng.random() < 0.5:
            kind = "failpoint"
            env["PIPELINE_FAILPOINT"] = f"{rng.choice(FAILPOINTS)}@{rng.randint(1, 4)}"
        else:
            kind = "timer"
        proc = pipeline(config, victim, env)
        if launches % 10 == 3 and kind != "none" and wait_until_locked(victim, proc):
            # A second process on the same run must be refused while the first holds it.
            second = pipeline(config, victim)
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
                stage = stage_in_progress(run_dir_of(victim))
                proc.kill()
        output, _ = proc.communicate()
        resumes += output.count("Fit: resuming from")
        detected += output.count("failed verification")
        for match in re.finditer(r"had reached step \d+; (\d+) steps are redone", output):
            redone_max = max(redone_max, int(match.group(1)))
        if proc.returncode == -signal.SIGKILL:
            if kind == "failpoint":
                stage = stage_in_progress(run_dir_of(victim))
            kills_by_stage[stage] += 1
            kills_by_kind[kind if kind == "timer" else env["PIPELINE_FAILPOINT"].split("@")[0]] += 1
            newest = newest_checkpoint(run_dir_of(victim))
            if newest is not None and rng.random() < args.corrupt_prob:
                corruptions.append(f"{newest.name}:{corrupt(newest, rng)}")
        elif proc.returncode == 0:
            finished = kind == "none" or sum(kills_by_stage.values()) >= args.kills
            if not finished and stage_in_progress(run_dir_of(victim)) == "done":
                # Finished before enough kills landed: start over to place the rest.
                subprocess.run(["rm", "-rf", str(victim)], check=True)
        else:
            print(f"FAIL: run exited {proc.returncode}:\n{output[-3000:]}")
            return 1
        print(
            f"  launch {launches}: {kind:9s} exit {proc.returncode:4d}  kills so far "
            f"{sum(kills_by_stage.values())}",
            flush=True,
        )

    run_dir = run_dir_of(victim)
    ref_state, state = final_state(ref_dir), final_state(run_dir)
    weights_equal = sorted(ref_state) == sorted(state) and all(
        np.array_equal(ref_state[k], state[k]) for k in ref_state
    )
    ref_metrics = json.loads((ref_dir / "metrics.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics_equal = all(ref_metrics[k] == metrics[k] for k in ("test_loss", "test_accuracy"))
    predictions_equal = np.array_equal(export_predictions(ref_dir), export_predictions(run_dir))
    leftovers = [str(p) for p in run_dir.rglob("*.tmp-*")]
    ok = weights_equal and metrics_equal and predictions_equal and not leftovers
    print("\n== crash test summary ==")
    print(f"config: train {' '.join(config)}")
    print(
        f"kills injected: {sum(kills_by_stage.values())} "
        f"(by stage: {dict(sorted(kills_by_stage.items()))})"
    )
    print(f"kills by kind: {dict(sorted(kills_by_kind.items()))}")
    print(
        f"launches: {launches}; fit resumes: {resumes}; second processes refused: {lock_refusals}"
    )
    print(f"checkpoints corrupted: {len(corruptions)}; corruptions detected on load: {detected}")
    print(f"steps redone after a kill, at most: {redone_max} (checkpoint.every_steps bounds it)")
    print(f"temporary files left over: {len(leftovers)}")
    print(f"final weights bit-identical: {'yes' if weights_equal else 'NO'}")
    print(
        f"test metrics identical: {'yes' if metrics_equal else 'NO'} "
        f"(accuracy {metrics['test_accuracy']:.4f})"
    )
    print(f"exported predictions identical: {'yes' if predictions_equal else 'NO'}")
    print(f"RESULT: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

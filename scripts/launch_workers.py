"""Start N local workers of one multi-worker run on 127.0.0.1, for trying it on one machine.

    python scripts/launch_workers.py -n 2 -- train model=mlp data=sample fit.epochs=2

Each worker is `python -m pipeline <args> strategy=multi_worker` with its own TF_CONFIG (distinct
free ports). Worker 0 is the chief: it alone writes the run directory; the others log to
`<run>/pipeline.worker<i>.log` and write nothing else there. If one worker dies, the others are
stopped too (a multi-worker step needs all of them) and the launcher exits with the first
failing worker's code; run the same command again to resume from the chief's last checkpoint.
Ctrl-C / SIGTERM are passed to every worker: they agree on a step, save it, and stop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(ports: list[int], index: int) -> str:
    workers = [f"127.0.0.1:{p}" for p in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def worker_args(args: list[str], index: int) -> list[str]:
    """The pipeline command line of worker `index` (Hydra options go before the overrides)."""
    extra = ["strategy=multi_worker"]
    if index:
        # Only the chief writes Hydra's .hydra/ record and pipeline.log into the run directory.
        extra += [
            "hydra.output_subdir=null",
            f"hydra.job_logging.handlers.file.filename="
            f"${{hydra.runtime.output_dir}}/pipeline.worker{index}.log",
        ]
    return [sys.executable, "-m", "pipeline", *args, *extra]


def start(args: list[str], n: int) -> list[subprocess.Popen]:
    ports = free_ports(n)
    procs = []
    for i in range(n):
        env = {**os.environ, "TF_CONFIG": tf_config(ports, i)}
        procs.append(subprocess.Popen(worker_args(args, i), env=env))
        print(f"worker {i} pid {procs[-1].pid} port {ports[i]}", flush=True)
    return procs


def supervise(procs: list[subprocess.Popen], grace: float) -> int:
    """Wait for all workers; when one fails, stop the rest. Return the exit code."""
    failed_at: float | None = None
    code = 0
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            rc = p.poll()
            if rc not in (None, 0) and failed_at is None:
                print(
                    f"worker {i} exited with {rc}; stopping the others", file=sys.stderr, flush=True
                )
                failed_at, code = time.monotonic(), rc
                for q in procs:
                    if q.poll() is None:
                        q.send_signal(signal.SIGTERM)
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for q in procs:
                if q.poll() is None:
                    q.kill()  # blocked in a collective with a dead peer
        time.sleep(0.1)
    codes = [p.returncode for p in procs]
    return code or next((c for c in codes if c), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--workers", type=int, default=2)
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds the others get to exit after one worker failed",
    )
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="pipeline command and overrides, after --"
    )
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    if not args:
        parser.error("give the pipeline command, e.g. -- train model=mlp")
    procs = start(args, opts.workers)

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return supervise(procs, opts.grace)


if __name__ == "__main__":
    sys.exit(main())

"""Scaling out with TensorFlow's own engine (`strategy=mirrored|multi_worker`).

`strategy=default` never comes here: fit.py's single-device loop runs exactly as before.

Under a strategy the same loop runs on every worker in lockstep. What changes:
- the global batch stays `fit.batch_size`; every worker takes the same global batch of the
  epoch's permutation, applies the augmentation to the whole batch (so the shifts are those of a
  single-device run) and trains on its own contiguous slice of it; gradients are summed over
  the replicas, each loss scaled by 1/global batch, so an update is the mean over the global
  batch, and the learning rate is left as configured (it belongs to the global batch);
- only the chief (worker 0) writes to the run directory; the others work in a scratch
  directory that is deleted at the end. Every worker restores from the chief's checkpoints,
  and the workers agree on the step before training;
- a stop request (SIGINT/SIGTERM/SIGUSR1) on any worker is shared with all in the next step, so
  all of them save the same step and stop together.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """This process's place in the cluster (no TensorFlow needed to know it)."""

    index: int = 0  # 0 is the chief
    count: int = 1

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def cluster_source(cluster: str) -> str:
    """`tf_config` or `slurm`: where a multi-worker cluster is described."""
    if cluster != "auto":
        return cluster
    if os.environ.get("TF_CONFIG"):
        return "tf_config"
    if os.environ.get("SLURM_PROCID") is not None:
        return "slurm"
    raise ConfigError(
        "strategy=multi_worker needs a cluster: set TF_CONFIG (see "
        "scripts/launch_workers.py) or run under Slurm's srun"
    )


def worker_from_tf_config(text: str) -> Worker:
    try:
        tf_config = json.loads(text)
        cluster, task = tf_config["cluster"], tf_config["task"]
        chiefs = len(cluster.get("chief", []))
        count = chiefs + len(cluster.get("worker", []))
        index = int(task["index"]) + (chiefs if task["type"] == "worker" else 0)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"TF_CONFIG is not a valid cluster description ({exc})") from exc
    return Worker(index, count)


def worker_of(name: str, cluster: str) -> Worker:
    if name != "multi_worker":
        return Worker()
    if cluster_source(cluster) == "tf_config":
        return worker_from_tf_config(os.environ["TF_CONFIG"])
    return Worker(int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_NTASKS", "1")))


def make_strategy(name: str, cluster: str) -> Any:
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    resolver = None
    if cluster_source(cluster) == "slurm":
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
    # RING all-reduce works on CPUs and GPUs alike; NCCL is picked by AUTO only for GPUs.
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
    )
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )


@dataclass
class ScaleOut:
    """What fit and the CLI need to know about a distributed run."""

    strategy: Any
    worker: Worker
    run_dir: Path  # the real run directory (the chief's)
    work_dir: Path  # where this process writes: run_dir on the chief, scratch elsewhere

    def trainer(self, *args: Any) -> Any:
        return DistributedTrainer(self.strategy, *args)

    def load_latest(self, trainer: Any) -> Any:
        """The chief's newest good checkpoint, the same one on every worker."""
        from pipeline import checkpoint
        from pipeline.rundir import RunDir

        root = RunDir(self.run_dir).checkpoints
        mine = checkpoint.load_latest(root, owner=self.worker.is_chief)
        step = -1 if mine is None else mine.step
        low, high = trainer.agree(step)
        if low != high:  # e.g. run.outputs is not on a filesystem every worker shares
            raise PipelineError(
                f"The workers see different newest checkpoints in {root} (steps "
                f"{'none' if low < 0 else low} to {high}). Every worker must read the chief's "
                "run directory: put run.outputs on a shared filesystem, then run again."
            )
        return mine

    def stop_flag(self, trainer: Any, local: Callable[[], bool]) -> Callable[[], bool]:
        trainer.local_stop = local
        return lambda: trainer.stop_agreed

    def cleanup(self) -> None:
        if not self.worker.is_chief:
            shutil.rmtree(self.work_dir, ignore_errors=True)


SCRATCH_PREFIX = "pipeline-worker"


def remove_stale_scratch(root: Path) -> list[Path]:
    """Delete the scratch directories under `root` of non-chief workers that no longer run (a
    SIGKILLed worker cannot delete its own); a directory whose process lives is kept."""
    removed = []
    for path in root.glob(f"{SCRATCH_PREFIX}*-pid*-*"):
        match = re.search(r"-pid(\d+)-", path.name)
        if match is None or not path.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:
            pass  # alive, another user's
    return removed


def setup(name: str, cluster: str, run_dir: Path) -> ScaleOut | None:
    """Create the strategy (before any other TensorFlow op, as tf.distribute requires)."""
    if name == "default":
        return None
    worker = worker_of(name, cluster)
    strategy = make_strategy(name, cluster)
    work_dir = run_dir
    if not worker.is_chief:
        scratch_root = Path(tempfile.gettempdir())
        for stale in remove_stale_scratch(scratch_root):
            log.info("Removed the scratch directory %s of a worker that was killed", stale)
        work_dir = Path(
            tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{worker.index}-pid{os.getpid()}-")
        )
    log.info(
        "Strategy %s: worker %d of %d%s, %d replicas in sync",
        name,
        worker.index,
        worker.count,
        " (chief)" if worker.is_chief else f", scratch {work_dir}",
        strategy.num_replicas_in_sync,
    )
    return ScaleOut(strategy, worker, run_dir, work_dir)


def shard_sizes(global_batch: int, replicas: int) -> list[int]:
    base, extra = divmod(global_batch, replicas)
    return [base + (i < extra) for i in range(replicas)]


def _trainer_base() -> type:
    from pipeline.fit import Trainer

    return Trainer


class DistributedTrainer(_trainer_base()):  # type: ignore[misc]
    """fit.Trainer with its variables mirrored by `strategy` and a step that runs on every
    replica. Serialization, evaluation and metrics are inherited unchanged."""

    def __init__(self, strategy: Any, *args: Any) -> None:
        import tensorflow as tf

        self.strategy = strategy
        with strategy.scope():
            super().__init__(*args)
        self.replicas = strategy.num_replicas_in_sync
        # BatchNorm's moving statistics are updated by each replica from its own slice: they are
        # averaged over the replicas after every step, so every worker holds the same model.
        self._averaged = [
            v for v in self.model.non_trainable_variables if v.dtype.startswith("float")
        ]
        self.local_stop: Callable[[], bool] = lambda: False
        self.stop_agreed = False
        batch = self.fit_cfg.batch_size
        sizes = {min(batch, self.n_train), self.n_train % batch or batch}
        if min(sizes) < self.replicas:
            raise PipelineError(
                f"A batch of {min(sizes)} images cannot be split over "
                f"{self.replicas} replicas; choose another fit.batch_size"
            )
        self._dist_steps = {
            size: tf.function(
                self._global_step,
                input_signature=[tf.TensorSpec([size], tf.int32), tf.TensorSpec([], tf.int32)],
            )
            for size in sizes
        }
        self._agree = tf.function(self._agree_step, input_signature=[tf.TensorSpec([], tf.int64)])
        per_replica = "/".join(str(s) for s in sorted(set(shard_sizes(batch, self.replicas))))
        log.info(
            "Global batch %d = %d replicas x %s per replica; learning rate %g as "
            "configured (it is the global batch's: no scaling)",
            batch,
            self.replicas,
            per_replica,
            self.current_lr(),
        )

    def current_lr(self) -> float:
        from pipeline.fit import current_lr

        return current_lr(self.optimizer)

    def _replica_step(self, indices: Any, stop: Any) -> tuple:
        import tensorflow as tf

        ctx = tf.distribute.get_replica_context()
        replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
        n = int(indices.shape[0])
        base, extra = divmod(n, self.replicas)
        start = replica * base + tf.minimum(replica, extra)
        size = base + tf.cast(replica < extra, tf.int32)
        x, y = self._batch(indices)  # the global batch (and its single-device shifts)
        sums = self._learn(x[start : start + size], y[start : start + size], n)
        stats = [tf.identity(v.value) for v in self._averaged]
        return stats, (*sums, tf.cast(stop, tf.int64))

    def _global_step(self, indices: Any, stop: Any) -> Any:
        import tensorflow as tf

        stats, sums = self.strategy.run(self._replica_step, args=(indices, stop))
        for var, value in zip(self._averaged, stats, strict=True):
            var.assign(self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None))
        *reduced, stops = [
            self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in sums
        ]
        self._record(*reduced)
        return stops

    def train_step(self, indices: Any) -> None:
        import tensorflow as tf

        stop = tf.constant(int(self.local_stop()), tf.int32)
        stops = self._dist_steps[len(indices)](tf.constant(indices), stop)
        self.stop_agreed = bool(int(stops.numpy()))

    def _agree_step(self, value: Any) -> tuple:
        import tensorflow as tf

        def gather() -> tuple:
            every = tf.distribute.get_replica_context().all_gather(tf.reshape(value, [1]), 0)
            return tf.reduce_min(every), tf.reduce_max(every)

        low, high = self.strategy.run(gather)
        local = self.strategy.experimental_local_results
        return local(low)[0], local(high)[0]

    def agree(self, value: int) -> tuple[int, int]:
        """(min, max) of `value` over all workers."""
        import tensorflow as tf

        low, high = self._agree(tf.constant(value, tf.int64))
        return int(low.numpy()), int(high.numpy())

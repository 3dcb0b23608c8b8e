"""The fit stage: a short, explicit train loop built so that an interrupted run resumes exactly.

Everything that decides the next update is either in a checkpoint or a pure function of
(seed, epoch, step): the model's variables (Dropout's seed-generator state included), the
optimizer's variables (iteration count included, which drives the learning-rate schedule), the
metric accumulators of the current epoch, and the loop position. The data order of epoch `e` is
`permutation(seed, e)`, so a resumed run feeds exactly the batches the lost run would have.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from pipeline import checkpoint, rundir, tblog
from pipeline.config import (
    CheckpointConfig,
    FitConfig,
    OptimizerConfig,
    OptimizerName,
    ProgressMode,
    Schedule,
    hparam_values,
)
from pipeline.data import Prepared
from pipeline.errors import Interrupted, PipelineError
from pipeline.models import (
    ModelConfig,
    Pixels,
    after_restore,
    build_model,
    fuse_batch_norm,
    inference_function,
)
from pipeline.rundir import RunDir
from pipeline.tblog import TRAIN, VALIDATION

if TYPE_CHECKING:
    from pipeline.stages import Context

log = logging.getLogger(__name__)
EVAL_BATCH = 1000


class NonFiniteLoss(PipelineError):
    pass


def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of training examples in `epoch`: a pure function, so it needs no saving."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def random_shift(images: tf.Tensor, max_shift: int, seed: tf.Tensor) -> tf.Tensor:
    """Shift each raw image `[N, 28, 28]` by its own random offset of up to `max_shift` pixels,
    filling with black (0).

    The offsets are a pure function of `seed` (the run's seed and the step number), so an
    augmented run needs no RNG state to resume exactly.
    """
    pad = max_shift
    x = tf.pad(images, [[0, 0], [pad, pad], [pad, pad]])
    offsets = tf.random.stateless_uniform(
        (tf.shape(x)[0], 2), seed=seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32
    )
    rows = offsets[:, :1] + tf.range(28)[None, :]
    cols = offsets[:, 1:] + tf.range(28)[None, :]
    x = tf.gather(x, rows, axis=1, batch_dims=1)
    return tf.gather(x, cols, axis=2, batch_dims=1)


def _constant(cfg: OptimizerConfig, steps_per_epoch: int, total: int, warmup: int) -> Any:
    if not warmup:
        return cfg.learning_rate
    # Keras' own cosine with alpha=1 is flat after its warm-up: a schedule that model.keras
    # can carry and a process without this package can load.
    return keras.optimizers.schedules.CosineDecay(
        0.0, max(total - warmup, 1), alpha=1.0, warmup_target=cfg.learning_rate, warmup_steps=warmup
    )


def _cosine(cfg: OptimizerConfig, steps_per_epoch: int, total: int, warmup: int) -> Any:
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else cfg.learning_rate,
        max(total - warmup, 1),
        alpha=0.0,
        warmup_target=cfg.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def _restarts(cfg: OptimizerConfig, steps_per_epoch: int, total: int, warmup: int) -> Any:
    # Cosine cycles of cycle_epochs, 2x, 4x, ...: each cycle ends annealed, so the model is
    # good early (end of the first cycle) and keeps improving in the longer ones.
    return keras.optimizers.schedules.CosineDecayRestarts(
        cfg.learning_rate,
        max(int(cfg.cycle_epochs * steps_per_epoch), 1),
        t_mul=2.0,
        m_mul=1.0,
        alpha=0.0,
    )


def _onecycle(cfg: OptimizerConfig, steps_per_epoch: int, total: int, warmup: int) -> Any:
    return keras.optimizers.schedules.CosineDecay(
        cfg.learning_rate / 25,
        max(total - max(warmup, 1), 1),
        alpha=0.0,
        warmup_target=cfg.learning_rate,
        warmup_steps=max(warmup, total // 4, 1),
    )


# optimizer.schedule=<name>: the learning rate as a function of the step (a pure function, so
# resuming needs only the optimizer's iteration count).
SCHEDULES: dict[Schedule, Callable[[OptimizerConfig, int, int, int], Any]] = {
    Schedule.constant: _constant,
    Schedule.cosine: _cosine,
    Schedule.restarts: _restarts,
    Schedule.onecycle: _onecycle,
}
OPTIMIZERS: dict[OptimizerName, Callable[[Any, OptimizerConfig], keras.optimizers.Optimizer]] = {
    OptimizerName.adam: lambda lr, cfg: keras.optimizers.Adam(lr),
    OptimizerName.sgd: lambda lr, cfg: keras.optimizers.SGD(lr, momentum=cfg.momentum),
}


def make_optimizer(
    cfg: OptimizerConfig, steps_per_epoch: int, epochs: int
) -> keras.optimizers.Optimizer:
    total = steps_per_epoch * epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    lr = SCHEDULES[Schedule(cfg.schedule)](cfg, steps_per_epoch, total, warmup)
    return OPTIMIZERS[OptimizerName(cfg.name)](lr, cfg)


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


@dataclass
class LoopState:
    """Where the loop is, and what it has learned about the run so far (all JSON)."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # steps of `epoch` already done
    global_step: int = 0
    best_value: float | None = None  # best validation accuracy so far
    best_step: int | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # one row per finished epoch
    resumes: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time spent in this loop, over all sessions


class Trainer:
    """Owns the model, optimizer and accumulators of one fit, and their (de)serialization."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        opt_cfg: OptimizerConfig,
        fit_cfg: FitConfig,
        seed: int,
        data: Prepared,
        pixels: Pixels,
    ) -> None:
        keras.utils.set_random_seed(seed)
        self.seed = seed
        self.fit_cfg = fit_cfg
        self.x_train = tf.constant(data.arrays["x_train"])  # raw uint8: the model preprocesses
        self.y_train = tf.constant(data.arrays["y_train"])
        self.n_train = int(self.y_train.shape[0])
        self.steps_per_epoch = math.ceil(self.n_train / fit_cfg.batch_size)
        self.model = build_model(model_cfg, pixels)
        if fit_cfg.fused_batch_norm:
            fuse_batch_norm(self.model)
        self.optimizer = make_optimizer(opt_cfg, self.steps_per_epoch, fit_cfg.epochs)
        # Built now, so restored optimizer state lands in real variables (Keras would
        # otherwise skip it and leave `iterations` at 0).
        self.optimizer.build(self.model.trainable_variables)
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.correct_sum = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.seen = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.first_bad_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        # One graph per batch shape, fixed up front: which shape is traced first must not
        # matter, or a resumed run (starting on the short last batch) would use other kernels
        # than an uninterrupted one and drift apart in the last bits.
        batch = fit_cfg.batch_size
        remainder = self.n_train % batch
        self._steps = {
            size: tf.function(self._step, input_signature=[tf.TensorSpec([size], tf.int32)])
            for size in {min(batch, self.n_train), remainder or batch}
        }
        self._logits = inference_function(self.model)

    # The training step, in three parts shared with distribute.DistributedTrainer (which runs
    # `_learn` on each replica's share of the batch and `_record` on the reduced sums).
    def _batch(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The images (augmented) and labels of one global batch."""
        x = tf.gather(self.x_train, indices)
        y = tf.gather(self.y_train, indices)
        if self.fit_cfg.augment_shift:
            step = tf.cast(self.optimizer.iterations, tf.int64)
            seed = tf.stack([tf.constant(self.seed, tf.int64), step])
            x = random_shift(x, self.fit_cfg.augment_shift, seed)
        return x, y

    def _learn(
        self, x: tf.Tensor, y: tf.Tensor, global_batch: int | None = None
    ) -> tuple[tf.Tensor, ...]:
        """One optimizer update from `x`, `y`: the whole batch, or a replica's share of a
        batch of `global_batch`; returns the summed loss, hits, count and whether the loss is
        finite."""
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            smoothing = self.fit_cfg.label_smoothing
            if smoothing:
                target = tf.one_hot(y, tf.shape(logits)[-1])
                losses = keras.losses.categorical_crossentropy(
                    target, logits, from_logits=True, label_smoothing=smoothing
                )
            else:  # its own branch: the default recipe's bits stay those of the sparse loss
                losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            if global_batch is None:
                # reduce_mean, not sum / n: other bits, and the default recipe's measured
                # trajectory (README: Performance) is this one's.
                loss = tf.reduce_mean(losses)
            else:  # summed over the replicas, the global batch's mean loss
                loss = tf.reduce_sum(losses) / global_batch
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply(grads, self.model.trainable_variables)
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int64), tf.cast(y, tf.int64))
        return (
            tf.reduce_sum(tf.cast(losses, tf.float64)),
            tf.reduce_sum(tf.cast(hits, tf.int64)),
            tf.size(y, out_type=tf.int64),
            tf.cast(tf.logical_not(tf.math.is_finite(loss)), tf.int64),
        )

    def _record(
        self, loss_sum: tf.Tensor, correct: tf.Tensor, seen: tf.Tensor, bad: tf.Tensor
    ) -> None:
        """Add a step's sums to the epoch's accumulators; note the first non-finite loss."""
        step = tf.cast(self.optimizer.iterations, tf.int64)  # the step after this update
        first = tf.logical_and(bad > 0, tf.equal(self.first_bad_step, 0))
        self.first_bad_step.assign(tf.where(first, step, self.first_bad_step))
        self.loss_sum.assign_add(loss_sum)
        self.correct_sum.assign_add(correct)
        self.seen.assign_add(seen)

    def _step(self, indices: tf.Tensor) -> None:
        x, y = self._batch(indices)
        self._record(*self._learn(x, y))

    def train_step(self, indices: np.ndarray) -> None:
        self._steps[len(indices)](tf.constant(indices))

    def train_metrics(self) -> tuple[float, float]:
        seen = max(int(self.seen.numpy()), 1)
        return float(self.loss_sum.numpy()) / seen, int(self.correct_sum.numpy()) / seen

    def reset_metrics(self) -> None:
        for var in (self.loss_sum, self.correct_sum, self.seen):
            var.assign(tf.zeros_like(var))

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Loss and accuracy of the current weights on uint8 images `x` with labels `y`."""
        return evaluate_logits(self._logits, x, y)

    # Serialization: every variable that influences the next update, keyed by position and path
    # so that a checkpoint from a different architecture is refused, not half-loaded.
    def _variables(self) -> list[tuple[str, tf.Variable]]:
        tracked = [("model", v) for v in self.model.variables]
        tracked += [("optimizer", v) for v in self.optimizer.variables]
        tracked += [("loop", v) for v in (self.loss_sum, self.correct_sum, self.seen)]
        return [(f"{group}/{i:04d}/{canonical_path(v)}", v) for i, (group, v) in enumerate(tracked)]

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(v.numpy()) for name, v in self._variables()}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        variables = self._variables()
        names = [name for name, _ in variables]
        if sorted(names) != sorted(arrays):
            missing = sorted(set(names) - set(arrays))[:3]
            extra = sorted(set(arrays) - set(names))[:3]
            raise PipelineError(
                f"The checkpoint does not match this model (missing {missing}, "
                f"unexpected {extra}). Use run.restart=true to start over."
            )
        for name, var in variables:
            var.assign(arrays[name])
        after_restore(self.model)


def canonical_path(var: Any) -> str:
    """A variable's path without Keras' per-process uniquifying suffixes (`seed_generator_1`,
    `dense_3/kernel`, and inside optimizer variable names `adam/dense_3_kernel_momentum`), so
    the same architecture gives the same names in every process, however many models the
    process built before (auto-named layers of a custom model included)."""
    return re.sub(r"_\d+(?=[/_]|$)", "", var.path if hasattr(var, "path") else var.name)


def _restore_group(group: str, variables: list, arrays: dict[str, np.ndarray]) -> None:
    names = sorted(k for k in arrays if k.startswith(group + "/"))
    if len(names) != len(variables) or any(
        not name.endswith("/" + canonical_path(var))
        for name, var in zip(names, variables, strict=True)
    ):
        raise PipelineError(
            f"The checkpoint's {group} state does not match this config. "
            "Use run.restart=true to start over."
        )
    for name, var in zip(names, variables, strict=True):
        var.assign(arrays[name])


def restore_model(model: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    """Load only the model's variables of a checkpoint (as Trainer saved them) into `model`."""
    _restore_group("model", model.variables, arrays)
    after_restore(model)


def restore_optimizer(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, arrays: dict[str, np.ndarray]
) -> None:
    """Load a checkpoint's optimizer state into `optimizer`, built for `model`'s variables."""
    optimizer.build(model.trainable_variables)
    _restore_group("optimizer", optimizer.variables, arrays)


def evaluate_logits(
    logits_fn: Callable[[tf.Tensor], tf.Tensor], x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """Mean loss and accuracy of `logits_fn` on raw images `x` with labels `y`."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = logits_fn(tf.constant(x[start : start + EVAL_BATCH]))
        labels = y[start : start + EVAL_BATCH]
        losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        loss_sum += float(tf.reduce_sum(tf.cast(losses, tf.float64)).numpy())
        correct += int((np.argmax(logits.numpy(), axis=-1) == labels).sum())
    return loss_sum / max(len(x), 1), correct / max(len(x), 1)


class Progress:
    """What the console shows while an epoch trains: Keras' live bar on a terminal; in a file
    (Slurm, submitit, CI, `tee`, `nohup`) one plain line every `fit.log_every_steps` steps,
    because the bar's carriage returns and colour codes turn a log file into one long line per
    epoch. `off` leaves the epoch summaries alone."""

    def __init__(self, mode: ProgressMode, epochs: int, steps: int) -> None:
        if mode is ProgressMode.auto:
            mode = ProgressMode.bar if sys.stdout.isatty() else ProgressMode.line
        self.mode, self.epochs, self.steps = mode, epochs, steps
        self.bar: Any = None
        self.last = 0.0

    def start_epoch(self, epoch: int, step_in_epoch: int, global_step: int) -> None:
        self.epoch = epoch
        self.since = (time.monotonic(), global_step)
        if self.mode is ProgressMode.bar:
            print(f"Epoch {epoch + 1}/{self.epochs}", flush=True)
            self.bar = keras.utils.Progbar(self.steps, stateful_metrics=["loss", "accuracy"])
            if step_in_epoch:
                self.bar.update(step_in_epoch)

    def update(self, step_in_epoch: int, trainer: Trainer) -> None:
        """After every step: the bar, a few times a second."""
        if self.mode is ProgressMode.bar:
            now = time.monotonic()
            if now - self.last > 0.25:
                self._bar(step_in_epoch, trainer, final=False)
                self.last = now

    def logged(self, step_in_epoch: int, global_step: int, loss: float, acc: float) -> None:
        """Every fit.log_every_steps steps, with the metrics just logged: the plain line."""
        if self.mode is ProgressMode.line and step_in_epoch < self.steps:
            # (the epoch's last step is said by its summary line)
            log.info(self.line(step_in_epoch, global_step, loss, acc))

    def end_epoch(self, step_in_epoch: int, trainer: Trainer) -> None:
        if self.mode is ProgressMode.bar:
            self._bar(step_in_epoch, trainer, final=True)

    def _bar(self, step: int, trainer: Trainer, final: bool) -> None:
        loss, acc = trainer.train_metrics()
        self.bar.update(step, values=[("loss", loss), ("accuracy", acc)], finalize=final)

    def line(self, step_in_epoch: int, global_step: int, loss: float, acc: float) -> str:
        """`Epoch 2/21 step 150/422: loss 0.1234, accuracy 0.9612, 61.3 steps/s, ETA epoch
        0:04, run 2:31` (the rate over this epoch's steps in this session)."""
        started, first = self.since
        rate = (global_step - first) / max(time.monotonic() - started, 1e-9)
        left_epoch = self.steps - step_in_epoch
        left_run = left_epoch + (self.epochs - self.epoch - 1) * self.steps
        return (
            f"Epoch {self.epoch + 1}/{self.epochs} step {step_in_epoch}/{self.steps}: "
            f"loss {loss:.4f}, accuracy {acc:.4f}, {rate:.1f} steps/s, "
            f"ETA epoch {_clock(left_epoch / rate)}, run {_clock(left_run / rate)}"
        )


class Profiler:
    """`fit.profile_steps=[first, last]`: TensorFlow's profiler traces those global steps into
    the train/ run's plugins/profile/ (where Keras' `profile_batch` puts them), read by
    TensorBoard's Profile tab (the tensorboard-plugin-profile package). Tracing does not change
    what is computed; a session that resumes inside the range traces the rest of it."""

    def __init__(self, steps: list[int] | None, logdir: Path) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.logdir, self.on, self.started = logdir, False, 0

    def before(self, step: int) -> None:
        if not self.on and self.first <= step <= self.last:
            tf.profiler.experimental.start(str(self.logdir))
            self.on, self.started = True, step

    def after(self, step: int) -> None:
        if self.on and step >= self.last:
            tf.profiler.experimental.stop()
            self.on = False
            log.info("Profile of steps %d-%d written to %s", self.started, step, self.logdir)


def _clock(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ---------------------------------------------------------------- the stage


def is_done(ctx: Context) -> str | None:
    """A fit that reached `fit.epochs` is skipped while its final checkpoint verifies. Under a
    strategy every worker enters fit (it holds collectives), even when done."""
    done = ctx.run.read_stage("fit", owner=True)
    if (
        done
        and ctx.scale is None
        and done["epochs"] >= ctx.cfg.fit.epochs
        and _final_checkpoint_ok(ctx.run, done)
    ):
        return f"fit: done ({done['epochs']} epochs, step {done['global_step']}); skipped"
    return None


def _final_checkpoint_ok(run: RunDir, done: dict[str, Any]) -> bool:
    """A finished fit counts only while its last checkpoint verifies; if that one was
    damaged, fit resumes from the newest good one and recomputes the rest exactly."""
    latest = checkpoint.load_latest(run.checkpoints)
    return latest is not None and latest.step == done["global_step"]


def run(ctx: Context) -> dict[str, Any]:
    """Train (or resume) to `fit.epochs`; a first SIGINT/SIGTERM saves a checkpoint and stops."""
    # Fit cuts TensorBoard events written after the checkpoint it resumes from, evaluate's
    # included: an earlier evaluation no longer stands, even of the same final step.
    rundir.clear_stage(ctx.run, "evaluate")
    c = ctx.cfg
    started = time.monotonic()
    # HParams from the start ("running"), so a sweep's table lists this run while it trains;
    # evaluate completes it ("success"), a failure here ends it ("failure").
    record = ctx.run.read_run_record()
    values = hparam_values(record.get("config", {}), c.fit.epochs, str(c.evaluate.checkpoint))

    def hparams(status: str) -> None:
        tblog.write_hparams(
            ctx.run.tensorboard, values, ctx.run.name, record.get("created"), status
        )

    hparams("running")
    ctx.stop.graceful = True
    try:
        summary = run_fit(
            c.model,
            c.optimizer,
            c.fit,
            c.checkpoint,
            c.seed,
            ctx.data(),
            ctx.pixels(),
            ctx.run,
            ctx.stop,
            ctx.scale,
        )
    except Interrupted:
        raise  # resumable: still "running" in the table, as it will be again
    except Exception:
        hparams("failure")
        raise
    finally:
        ctx.stop.graceful = False
    return {
        "epochs": c.fit.epochs,
        "global_step": summary["global_step"],
        "seconds_this_session": time.monotonic() - started,
        **summary,
    }


def run_fit(
    model_cfg: ModelConfig,
    opt_cfg: OptimizerConfig,
    fit_cfg: FitConfig,
    ckpt_cfg: CheckpointConfig,
    seed: int,
    data: Prepared,
    pixels: Pixels,
    run: RunDir,
    should_stop: Callable[[], bool] = lambda: False,
    scale: Any = None,
) -> dict[str, Any]:
    """Train to `fit_cfg.epochs`, resuming from the newest good checkpoint; return a summary.

    `scale` (a distribute.ScaleOut, or None for one device) trains under a tf.distribute
    strategy; `run` is then where this worker writes, and it restores from the chief's.
    """
    if scale is None:
        trainer = Trainer(model_cfg, opt_cfg, fit_cfg, seed, data, pixels)
    else:
        trainer = scale.trainer(model_cfg, opt_cfg, fit_cfg, seed, data, pixels)
        should_stop = scale.stop_flag(trainer, should_stop)
    ckpt_root = run.checkpoints
    state = LoopState()
    latest = checkpoint.load_latest(ckpt_root) if scale is None else scale.load_latest(trainer)
    if latest is not None:
        trainer.restore(latest.arrays)
        state = LoopState(**latest.meta["loop"])
        state.resumes.append({"step": state.global_step, "epoch": state.epoch, "time": time.time()})
        log.info(
            "Fit: resuming from %s (epoch %d, step %d of %d in the epoch)",
            latest.path.name,
            state.epoch + 1,
            state.step_in_epoch,
            trainer.steps_per_epoch,
        )
    tb_dir = run.tensorboard
    tb_dir.mkdir(parents=True, exist_ok=True)
    if latest is not None:
        reached = tblog.last_step(tb_dir)
        if reached > state.global_step:
            log.info(
                "Fit: the interrupted session had reached step %d; %d steps are redone",
                reached,
                reached - state.global_step,
            )
        run.update_session(
            resumed_from=state.global_step, redone_steps=max(0, reached - state.global_step)
        )
    dropped = tblog.truncate_after(tb_dir, state.global_step)
    if dropped:
        log.info("TensorBoard: dropped %d events written after the last checkpoint", dropped)
    # Keras' layout (pipeline/tblog.py): train/ and validation/ share their epoch_* tags.
    events = tblog.Runs(tb_dir, resumed_at=state.global_step + 1 if state.global_step else None)
    if state.global_step:
        events.scalar(TRAIN, tblog.RESUME_TAG, state.global_step, state.global_step)
    loop = _Loop(trainer, state, fit_cfg, ckpt_cfg, data, ckpt_root, events, should_stop, run)
    try:
        loop.run()
    finally:
        events.close()
    return {
        "global_step": state.global_step,
        "epochs_done": state.epoch,
        "stopped_early": state.stopped_early,
        "best_step": state.best_step,
        "best_val_accuracy": state.best_value,
        "history": state.history,
        "resumes": state.resumes,
    }


class _Loop:
    def __init__(
        self,
        trainer: Trainer,
        state: LoopState,
        fit_cfg: FitConfig,
        ckpt_cfg: CheckpointConfig,
        data: Prepared,
        ckpt_root: Path,
        events: tblog.Runs,
        should_stop: Callable[[], bool],
        run: RunDir,
    ) -> None:
        self.run_dir = run
        self.t, self.s, self.fit_cfg, self.ckpt_cfg = trainer, state, fit_cfg, ckpt_cfg
        self.data, self.ckpt_root, self.events, self.should_stop = (
            data,
            ckpt_root,
            events,
            should_stop,
        )
        self.last_save_time = time.monotonic()
        self.clock = time.monotonic()
        self.first_step_logged = False
        self.epoch_clock = (time.monotonic(), state.global_step)
        self.profiler = Profiler(fit_cfg.profile_steps, run.tensorboard / TRAIN)

    def _log_first_step(self) -> None:
        if not self.first_step_logged:
            # scripts/benchmark.py measures the resume latency with this record.
            self.run_dir.update_session(
                first_step_at=time.time(), first_step=self.s.global_step + 1
            )
            log.debug("Fit: first step of this session done (step %d)", self.s.global_step + 1)
            self.first_step_logged = True

    def _tick(self) -> None:
        """Add the wall time since the last tick to the run's training time."""
        now = time.monotonic()
        self.s.train_seconds += now - self.clock
        self.clock = now

    def run(self) -> None:
        t, s, cfg = self.t, self.s, self.fit_cfg
        if s.epoch >= cfg.epochs or s.stopped_early:
            log.info("Fit: already trained %d epochs; nothing to do", s.epoch)
            return
        progress = Progress(cfg.progress, cfg.epochs, t.steps_per_epoch)
        while s.epoch < cfg.epochs and not s.stopped_early:
            order = permutation(t.seed, s.epoch, t.n_train)
            progress.start_epoch(s.epoch, s.step_in_epoch, s.global_step)
            while s.step_in_epoch < t.steps_per_epoch:
                start = s.step_in_epoch * cfg.batch_size
                self.profiler.before(s.global_step + 1)
                t.train_step(order[start : start + cfg.batch_size])
                self.profiler.after(s.global_step + 1)
                if not self.first_step_logged:
                    self._log_first_step()
                s.step_in_epoch += 1
                s.global_step += 1
                progress.update(s.step_in_epoch, t)
                if s.global_step % cfg.log_every_steps == 0:
                    progress.logged(s.step_in_epoch, s.global_step, *self._log_step())
                last_in_epoch = s.step_in_epoch == t.steps_per_epoch
                if not last_in_epoch and self._checkpoint_due():
                    self._save()
                if self.should_stop():
                    if not last_in_epoch:
                        self._save()
                        raise self._interrupted()
                    break
            progress.end_epoch(s.step_in_epoch, t)
            self._end_epoch()
            if self.should_stop() and s.epoch < cfg.epochs:
                raise self._interrupted()

    def _interrupted(self) -> Interrupted:
        return Interrupted(
            f"Interrupted: checkpoint saved at step {self.s.global_step} "
            f"(epoch {self.s.epoch + 1}). Run the same command again to resume."
        )

    def _checkpoint_due(self) -> bool:
        c = self.ckpt_cfg
        if c.every_steps and self.s.global_step % c.every_steps == 0:
            return True
        return bool(c.every_seconds) and time.monotonic() - self.last_save_time >= c.every_seconds

    def _check_finite(self) -> None:
        bad = int(self.t.first_bad_step.numpy())
        if bad:
            kept = checkpoint.committed_steps(self.ckpt_root)
            last = f"step {kept[-1]}" if kept else "none yet"
            raise NonFiniteLoss(
                f"The training loss became NaN or infinite at step {bad}; stopped without "
                f"saving it. The last good checkpoint ({last}) is kept. Lower "
                "optimizer.learning_rate, or check the data, and rerun."
            )

    def _log_step(self) -> tuple[float, float]:
        """The step's TensorBoard scalars; returns the running loss and accuracy."""
        self._check_finite()
        loss, acc = self.t.train_metrics()
        step = self.s.global_step
        self.events.scalar(TRAIN, "batch_loss", loss, step)
        self.events.scalar(TRAIN, "batch_accuracy", acc, step)
        self.events.scalar(TRAIN, "batch_learning_rate", current_lr(self.t.optimizer), step)
        self.events.flush()
        return loss, acc

    def _save(self) -> None:
        self._check_finite()
        s = self.s
        if s.global_step in checkpoint.committed_steps(self.ckpt_root):
            return
        self._tick()
        self.events.sync()  # every event up to this step is durable before the commit
        meta = {
            "loop": s.__dict__,
            "epoch": s.epoch,
            "global_step": s.global_step,
            "data_fingerprint": self.data.fingerprint,
            "time": time.time(),
        }
        checkpoint.save(self.ckpt_root, s.global_step, self.t.state_arrays(), meta)
        checkpoint.retain(self.ckpt_root, self.ckpt_cfg.keep, s.best_step)
        self.last_save_time = time.monotonic()

    def _end_epoch(self) -> None:
        t, s = self.t, self.s
        self._check_finite()
        train_loss, train_acc = t.train_metrics()
        row = {
            "epoch": s.epoch + 1,
            "step": s.global_step,
            "loss": train_loss,
            "accuracy": train_acc,
        }
        # Keras' names, at the global step (the x axis of every curve, continuous on resume).
        self.events.scalar(TRAIN, "epoch_loss", train_loss, s.global_step)
        self.events.scalar(TRAIN, "epoch_accuracy", train_acc, s.global_step)
        self.events.scalar(
            TRAIN, "epoch_learning_rate", current_lr(self.t.optimizer), s.global_step
        )
        started, first_step = self.epoch_clock
        if s.global_step > first_step:
            self.events.scalar(
                TRAIN,
                "epoch_steps_per_second",
                (s.global_step - first_step) / max(time.monotonic() - started, 1e-9),
                s.global_step,
            )
        if len(self.data.arrays["y_val"]):
            val_loss, val_acc = t.evaluate(self.data.arrays["x_val"], self.data.arrays["y_val"])
            row.update(val_loss=val_loss, val_accuracy=val_acc)
            self.events.scalar(VALIDATION, "epoch_loss", val_loss, s.global_step)
            self.events.scalar(VALIDATION, "epoch_accuracy", val_acc, s.global_step)
            improved = s.best_value is None or val_acc > s.best_value
        else:
            val_acc, improved = train_acc, True  # no validation split: the newest is the best
        self._tick()
        row["train_seconds"] = s.train_seconds  # training and validation up to here
        if improved:
            s.best_value, s.best_step, s.epochs_without_improvement = val_acc, s.global_step, 0
        else:
            s.epochs_without_improvement += 1
        patience = self.fit_cfg.early_stopping_patience
        if patience and s.epochs_without_improvement >= patience:
            s.stopped_early = True
            log.info("Fit: early stop, no improvement for %d epochs", patience)
        log.info(
            "Epoch %d: %s",
            s.epoch + 1,
            ", ".join(
                f"{k}={v:.4f}"
                for k, v in row.items()
                if k not in ("epoch", "step", "train_seconds")
            ),
        )
        s.history.append(row)
        s.epoch += 1
        s.step_in_epoch = 0
        t.reset_metrics()
        self._save()
        self.epoch_clock = (time.monotonic(), s.global_step)

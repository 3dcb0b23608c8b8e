"""The recipe's knobs: warm-up under every schedule (applied, or refused where it cannot be),
label smoothing, and the experiment=fast preset."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY, cli, composed, final_state, only_run_dir

from pipeline import durable
from pipeline.configcheck import compose_and_check
from pipeline.errors import ConfigError


def test_warmup_under_restarts_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match=r"optimizer.warmup_epochs applies to the constant"):
        compose_and_check(["optimizer=adam_restarts", "optimizer.warmup_epochs=0.5"])
    compose_and_check(
        ["optimizer=adam_restarts", "optimizer.warmup_epochs=0.5", "optimizer.schedule=cosine"]
    )


def test_warmup_applies_to_the_constant_schedule() -> None:

    from pipeline.config import OptimizerConfig, Schedule
    from pipeline.fit import SCHEDULES

    cfg = OptimizerConfig(learning_rate=0.01, schedule=Schedule.constant)
    assert SCHEDULES[Schedule.constant](cfg, 100, 200, 0) == 0.01  # no warm-up: a plain number
    lr = SCHEDULES[Schedule.constant](cfg, 100, 200, 50)
    assert type(lr).__module__.startswith("keras.")  # Keras' own: model.keras loads without us
    values = [float(lr(step)) for step in (0, 25, 50, 51, 120, 199, 1000)]
    assert values[0] == 0.0 and values[1] == pytest.approx(0.005)
    assert values[2:] == pytest.approx([0.01] * 5)


def test_label_smoothing_is_checked_and_changes_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fit.label_smoothing=1.0 is not allowed"):
        compose_and_check(["fit.label_smoothing=1.0"])
    states, losses = [], []
    for smoothing in (0.0, 0.1):
        outputs = tmp_path / f"ls{smoothing}"
        args = ["train", *TINY, f"fit.label_smoothing={smoothing}", f"run.outputs={outputs}"]
        args += ["optimizer=adam_restarts"]  # no warm-up: TINY's 10 steps leave the start behind
        result = cli(args, tmp_path)
        assert result.returncode == 0, result.stderr
        run_dir = only_run_dir(outputs)
        states.append(final_state(run_dir))
        fit = durable.read_record(run_dir / "stages" / "fit.json")
        losses.append(fit["history"][-1]["loss"])
    # Smoothed targets keep the training loss away from 0: higher than with one-hot targets.
    assert losses[1] > losses[0], losses
    key = next(k for k in states[0] if k.startswith("model/") and "kernel" in k)
    assert not (states[0][key] == states[1][key]).all()


def test_fast_preset_is_one_epoch_of_one_cycle() -> None:
    cfg = composed(["experiment=fast"])
    assert (cfg.fit.epochs, cfg.fit.augment_shift, cfg.data.val_fraction) == (1, 0, 0.0)
    assert (cfg.optimizer.schedule, cfg.optimizer.learning_rate) == ("onecycle", 0.015)
    assert cfg.model.name == "cnn" and not cfg.model.batch_norm and cfg.model.dropout == 0.0
    assert list(cfg.model.filters) == [12, 24, 48] and cfg.model.convs_per_block == 1
    assert (cfg.fit.label_smoothing, cfg.fit.batch_size) == (0.1, 120)


def test_default_recipe() -> None:
    # README: the recipe. Two convolutions a block of 8-32-64, one cosine decay after a half-epoch
    # warm-up over 13 epochs, label smoothing 0.1; 99.67% at seed 0 (README: the recipe).
    cfg = composed([])
    assert (list(cfg.model.filters), cfg.model.convs_per_block) == ([8, 32, 64], 2)
    assert (cfg.model.batch_norm, cfg.model.dropout, cfg.model.dense_units) == (True, 0.1, 128)
    assert (cfg.optimizer.name, cfg.optimizer.learning_rate) == ("adam", 0.01)
    assert (cfg.optimizer.schedule, cfg.optimizer.warmup_epochs) == ("cosine", 0.5)
    assert (cfg.fit.epochs, cfg.fit.batch_size, cfg.fit.label_smoothing) == (13, 128, 0.1)
    assert (cfg.fit.augment_shift, cfg.checkpoint.every_steps) == (2, 100)


def test_presets_keep_their_recipes_whatever_the_default() -> None:
    # The reference's twin and the tutorial are other people's recipes: the default's label
    # smoothing and depth must not leak into them.
    cfg = composed(["experiment=keras_convnet"])
    assert (list(cfg.model.filters), cfg.model.convs_per_block) == ([32, 64], 1)
    assert (cfg.optimizer.schedule, cfg.optimizer.learning_rate) == ("constant", 0.001)
    assert (cfg.fit.label_smoothing, cfg.optimizer.warmup_epochs) == (0.0, 0.0)
    cfg = composed(["experiment=tutorial"])
    assert (cfg.model.name, cfg.fit.label_smoothing) == ("mlp", 0.0)

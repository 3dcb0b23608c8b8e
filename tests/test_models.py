"""pipeline.models: every model takes raw uint8 pixels and owns its preprocessing; registries."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline import data, fit, models
from pipeline.config import Dataset, OptimizerName, Schedule
from pipeline.errors import ConfigError
from pipeline.models import Pixels, build_model, check_model, config_class

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


def layer_output(model: keras.Model, layer: str, x: np.ndarray) -> np.ndarray:
    probe = keras.Model(model.input, model.get_layer(layer).output)
    return np.asarray(probe(x))


def test_every_config_file_has_a_builder_and_every_builder_a_config_file() -> None:
    files = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    assert files == models.names()
    assert {"cnn", "custom", "mlp"} <= set(files)


def test_every_choice_has_an_implementation() -> None:
    assert set(fit.SCHEDULES) == set(Schedule)
    assert set(fit.OPTIMIZERS) == set(OptimizerName)
    assert set(data.SOURCES) == set(Dataset)
    assert sorted(p.stem for p in (CONF / "data").glob("*.yaml")) == sorted(
        d.value for d in Dataset
    )


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_models_take_raw_uint8_pixels(name: str, images: np.ndarray) -> None:
    model = build_model(config_class(name)())
    assert model.inputs[0].dtype == "uint8" and tuple(model.input_shape) == (None, 28, 28)
    assert tuple(model.output_shape) == (None, 10)
    assert np.asarray(model(images, training=False)).shape == (5, 10)


def test_mlp_scales_and_flattens_inside_the_model(images: np.ndarray) -> None:
    # The tutorial's math: flat 784 values divided by 255.
    model = build_model(config_class("mlp")())
    flat = layer_output(model, "flat", images)
    assert flat.dtype == np.float32 and flat.shape == (5, 784)
    np.testing.assert_allclose(flat, images.reshape(5, 784) / 255.0, rtol=1e-6)


def test_standardize_uses_the_training_statistics(images: np.ndarray) -> None:
    model = build_model(config_class("cnn")(), Pixels("standardize", 0.13, 0.31))
    out = layer_output(model, "channels", images)[..., 0]
    np.testing.assert_allclose(out, (images / 255.0 - 0.13) / 0.31, rtol=1e-5, atol=1e-5)


def test_standardization_lives_in_the_weights(images: np.ndarray) -> None:
    # A model built without the statistics gets them back from a checkpoint's arrays.
    trained = build_model(config_class("mlp")(), Pixels("standardize", 0.2, 0.4))
    arrays = {
        f"model/{i:04d}/{fit.canonical_path(v)}": np.asarray(v)
        for i, v in enumerate(trained.variables)
    }
    fresh = build_model(config_class("mlp")(), Pixels("standardize"))
    fit.restore_model(fresh, arrays)
    np.testing.assert_array_equal(
        np.asarray(fresh(images, training=False)), np.asarray(trained(images, training=False))
    )


def test_probabilities_head(images: np.ndarray) -> None:
    model = build_model(config_class("mlp")())
    probs = np.asarray(models.with_probabilities(model)(images, training=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(
        probs.argmax(1), np.asarray(model(images, training=False)).argmax(1)
    )


def test_check_model_names_the_problem() -> None:
    flat = keras.Input((784,))
    with pytest.raises(ConfigError, match=r"mine takes inputs of shape \[\(None, 784\)\]"):
        check_model(keras.Model(flat, keras.layers.Dense(10)(flat)), "mine")
    image = keras.Input((28, 28), dtype="uint8")
    wrong = keras.layers.Dense(3)(keras.layers.Flatten()(image))
    with pytest.raises(ConfigError, match=r"mine returns outputs of shape \[\(None, 3\)\]"):
        check_model(keras.Model(image, wrong), "mine")
    with pytest.raises(ConfigError, match="mine returned int, not a keras.Model"):
        check_model(3, "mine")


def _bn_in_training(fused: bool, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """One BatchNormalization layer (non-trivial gamma, beta and moving statistics) called in
    training mode on `x`: its output and its variables afterwards."""
    inputs = keras.Input(shape=x.shape[1:])
    model = keras.Model(inputs, keras.layers.BatchNormalization(momentum=0.9, name="bn")(inputs))
    rng = np.random.default_rng(1)
    channels = x.shape[-1]
    model.get_layer("bn").set_weights(
        [
            rng.uniform(0.5, 2, channels),
            rng.normal(size=channels),
            rng.normal(size=channels),
            rng.uniform(0.5, 2, channels),
        ]
    )
    if fused:
        assert models.fuse_batch_norm(model) == 1
    out = np.asarray(model(x, training=True))
    return out, [np.asarray(v) for v in model.get_layer("bn").weights]


def test_fused_batch_norm_trains_like_keras() -> None:
    # A batch of 2 with 2x2 pixels: 8 values per channel, so the kernel's unbiased variance
    # (x 8/7) would show in the moving variance if it were averaged in as it comes.
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(2, 2, 2, 3)).astype("float32")
    keras_out, keras_vars = _bn_in_training(False, x)
    fused_out, fused_vars = _bn_in_training(True, x)
    np.testing.assert_allclose(fused_out, keras_out, rtol=1e-5, atol=1e-5)
    for fused_var, keras_var in zip(fused_vars, keras_vars, strict=True):
        np.testing.assert_allclose(fused_var, keras_var, rtol=1e-5, atol=1e-6)


def test_fused_batch_norm_is_for_training_only(images: np.ndarray) -> None:
    cfg = config_class("cnn")(filters=[4, 8], batch_norm=True)
    keras.utils.set_random_seed(0)
    plain = build_model(cfg)
    keras.utils.set_random_seed(0)
    fused = build_model(cfg)
    assert models.fuse_batch_norm(fused) == 2
    # Inference is Keras' own code, bit for bit ...
    np.testing.assert_array_equal(np.asarray(fused(images)), np.asarray(plain(images)))
    # ... the variables are the same set (a checkpoint holds the same arrays) ...
    paths = [fit.canonical_path(v) for v in plain.variables]
    assert [fit.canonical_path(v) for v in fused.variables] == paths
    # ... and the kernel only replaces Keras' layer where it computes the same thing.
    x = np.ones((2, 4, 4, 3), "float32")
    inputs = keras.Input(shape=(4, 4, 3))
    axis1 = keras.Model(inputs, keras.layers.BatchNormalization(axis=1)(inputs))
    assert models.fuse_batch_norm(axis1) == 0
    np.asarray(axis1(x, training=True))


@pytest.mark.parametrize("fused", [True, False])
def test_fit_trains_with_the_fused_kernel_unless_told_not_to(tmp_path: Path, fused: bool) -> None:
    from hydra import compose, initialize_config_dir

    from pipeline.config import to_config
    from pipeline.configcheck import CONF_DIR
    from pipeline.data import prepare_run_data

    overrides = ["data=sample", "data.train_size=200", f"fit.fused_batch_norm={fused}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose("config", overrides=overrides))
    prepared = prepare_run_data(cfg.data, tmp_path)
    trainer = fit.Trainer(
        cfg.model, cfg.optimizer, cfg.fit, cfg.seed, prepared, prepared.pixels(cfg.data.normalize)
    )
    kinds = {
        type(layer).__name__
        for layer in trainer.model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert kinds == {"FusedTrainingBatchNormalization" if fused else "BatchNormalization"}

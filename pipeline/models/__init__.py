"""Models: one module per architecture, each a Keras model from raw pixels to class scores.

A model takes uint8 images `[N, 28, 28]` exactly as they are stored and owns its preprocessing
(cast, scaling or standardization, reshape) as Keras layers, so a checkpoint, an export or a
model loaded in a notebook needs nothing from this package to be fed. Outputs are logits; the
exports add a softmax (`with_probabilities`).

Adding an architecture is one module here plus one YAML file in `conf/model/`:

    @dataclass
    class ResNetConfig(ModelConfig):
        name: str = "resnet"
        blocks: int = 3

    @register("resnet", ResNetConfig)
    def build(cfg: ResNetConfig, pixels: Pixels) -> keras.Model: ...

`register` also registers the dataclass as the Hydra schema `model/<name>_schema`, which the
YAML file names in its defaults list. Nothing here imports TensorFlow at module level: the
entry point checks a config before TensorFlow starts.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pipeline import durable
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from pipeline.stages import Context

IMAGE_SHAPE = (28, 28)
CLASSES = 10


@dataclass
class ModelConfig:
    """Fields every model config has; each architecture subclasses it with its own."""

    name: str = MISSING

    def problems(self) -> list[str]:
        """Range checks a type cannot express, one message per bad key."""
        return []


@dataclass(frozen=True)
class Pixels:
    """How raw pixels become model input: `scale` (x / 255) or `standardize` ((x / 255 - mean)
    / std over the training slice; mean and std are weights of a Keras Normalization layer, so
    they are in every checkpoint and export)."""

    normalize: str = "scale"
    mean: float = 0.0
    std: float = 1.0

    def input(self) -> keras.KerasTensor:
        import keras

        return keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image")

    def scaled(self, image: keras.KerasTensor) -> keras.KerasTensor:
        """`image` (raw uint8) as float32 pixels in [0, 1], or standardized."""
        import keras

        x = keras.layers.Rescaling(1.0 / 255.0, name="scale")(image)
        if self.normalize == "standardize":
            # One channel axis, so mean and variance are weights of shape (1,) (axis=None does
            # not survive a .keras round trip in Keras 3.15).
            x = keras.layers.Reshape((*IMAGE_SHAPE, 1), name="standardize_in")(x)
            norm = keras.layers.Normalization(axis=-1, name="standardize")
            x = norm(x)
            norm.set_weights([_array([self.mean]), _array([self.std**2]), _array(0, "int64")])
            norm.finalize_state()
            x = keras.layers.Reshape(IMAGE_SHAPE, name="standardize_out")(x)
        return x


def _array(value: Any, dtype: str = "float32") -> Any:
    import numpy as np

    return np.asarray(value, dtype=dtype)


Builder = Callable[[Any, Pixels], "keras.Model"]
_REGISTRY: dict[str, tuple[type[ModelConfig], Builder]] = {}


def register(name: str, config: type[ModelConfig]) -> Callable[[Builder], Builder]:
    """Register an architecture's builder and config schema under `model=<name>`."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = (config, builder)
        ConfigStore.instance().store(group="model", name=f"{name}_schema", node=config)
        return builder

    return decorate


def _load_builtin() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def names() -> list[str]:
    return sorted(_REGISTRY)


def config_class(name: str) -> type[ModelConfig]:
    return _REGISTRY[name][0]


def build_model(cfg: ModelConfig, pixels: Pixels = Pixels()) -> keras.Model:
    """The model `cfg` describes, checked to map raw pixels to CLASSES scores."""
    import tensorflow as tf

    # Every computation of every stage starts from a built model, so this is where a process
    # commits to deterministic kernels: without it, an evaluate resumed in a fresh process
    # scored the same weights with other reduction orders than the process that ran fit.
    tf.config.experimental.enable_op_determinism()
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name={cfg.name!r} has no builder; available: {names()}")
    model = _REGISTRY[cfg.name][1](cfg, pixels)
    check_model(model, f"model={cfg.name}")
    return model


def check_model(model: Any, where: str) -> None:
    """Refuse, in one line, a model that does not take raw pixels to CLASSES scores."""
    import keras

    if not isinstance(model, keras.Model):
        raise ConfigError(f"{where} returned {type(model).__name__}, not a keras.Model")
    if len(model.inputs) != 1 or tuple(model.inputs[0].shape[1:]) != IMAGE_SHAPE:
        shapes = [tuple(t.shape) for t in model.inputs]
        raise ConfigError(
            f"{where} takes inputs of shape {shapes}; it must take one input of raw pixels "
            f"(None, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}) uint8"
        )
    if len(model.outputs) != 1 or tuple(model.outputs[0].shape[1:]) != (CLASSES,):
        shapes = [tuple(t.shape) for t in model.outputs]
        raise ConfigError(
            f"{where} returns outputs of shape {shapes}; it must return one (None, {CLASSES}) "
            "output of class scores (logits)"
        )


def inference_function(model: keras.Model) -> tf.types.experimental.PolymorphicFunction:
    """The model's logits in inference mode, traced once for any batch size: the same graph
    (and kernels) in fit's validation, evaluate and export, whatever batch comes first."""
    import tensorflow as tf

    spec = model.inputs[0]
    return tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([None, *spec.shape[1:]], spec.dtype)],
    )


def with_probabilities(model: keras.Model) -> keras.Model:
    """The same layers (and variables) with a softmax at the end: raw pixels -> probabilities,
    what every export serves."""
    import keras

    probabilities = keras.layers.Softmax(name="probabilities")(model.outputs[0])
    return keras.Model(model.input, probabilities, name=model.name)


def after_restore(model: keras.Model) -> None:
    """Let layers that derive state from their variables (Normalization's mean and variance)
    see variables that were assigned from a checkpoint."""
    for layer in model._flatten_layers(include_self=False):
        finalize = getattr(layer, "finalize_state", None)
        if finalize is not None:
            finalize()


def fuse_batch_norm(model: keras.Model) -> int:
    """Let `model`'s BatchNormalization layers train with TensorFlow's fused kernel; returns how
    many. For training only (fit): the model's saved form must stay Keras' own layer.

    Keras 3 runs BatchNormalization as separate moments and arithmetic ops on TensorFlow, ~40%
    of a step of the default convnet on a CPU; `FusedBatchNormV3` does the same in one kernel
    (README: Performance). The layer keeps its class's variables, so a checkpoint is the same
    set of arrays; inference, and any layer the kernel cannot serve, is Keras' own code."""
    import keras

    fused = 0
    for layer in model._flatten_layers(include_self=False):
        if type(layer) is keras.layers.BatchNormalization and _fusable(layer):
            # A class swap, not a rebuilt model: the variables, their initial values and the
            # layer's place in the graph stay exactly those build_model made.
            layer.__class__ = _fused_class()
            fused += 1
    return fused


def _fusable(layer: Any) -> bool:
    # input_spec, not layer.input: it is set by build() whether or not the layer sits in a
    # functional graph (a layer of a nested or shared sub-model has no single input).
    spec = layer.input_spec
    return (
        spec is not None
        and spec.ndim == 4
        and layer.axis in (-1, 3)
        and layer.center
        and layer.scale
        and not layer.renorm
        and not layer.synchronized
        and layer.compute_dtype == "float32"
    )


_FUSED: type | None = None


def _fused_class() -> type:
    global _FUSED
    if _FUSED is None:
        import keras
        import tensorflow as tf

        class FusedTrainingBatchNormalization(keras.layers.BatchNormalization):
            def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
                if not (training and self.trainable) or mask is not None:
                    return super().call(inputs, training=training, mask=mask)
                y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                    inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True
                )
                # The kernel returns the unbiased batch variance; Keras' moving variance
                # averages the biased one.
                n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], variance.dtype)
                variance = variance * (n - 1.0) / n
                momentum = self.momentum
                self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
                self.moving_variance.assign(
                    self.moving_variance * momentum + variance * (1.0 - momentum)
                )
                return y

        _FUSED = FusedTrainingBatchNormalization
    return _FUSED


def summary_text(model: keras.Model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the model stage


def is_done(ctx: Context) -> str | None:
    """The model stage is done once its record exists; it is skipped without a note."""
    return "" if ctx.run.read_stage("model", owner=True) else None


def run(ctx: Context) -> dict[str, Any]:
    """Build the configured architecture and keep its layers in model_summary.txt."""
    model = build_model(ctx.cfg.model, ctx.pixels())
    durable.write_bytes(ctx.run.model_summary, summary_text(model).encode())
    return {"parameters": model.count_params()}


_load_builtin()

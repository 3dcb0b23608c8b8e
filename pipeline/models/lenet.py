"""LeNet-5 (LeCun et al., 1998), as Keras writes it today: 28x28 pixels padded to 32x32,
conv(5x5, 6) - avg-pool - conv(5x5, 16) - avg-pool - dense 120 - dense 84 - logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.models import ModelConfig, Pixels, register

if TYPE_CHECKING:
    import keras


@dataclass
class LeNetConfig(ModelConfig):
    name: str = "lenet"
    activation: str = "tanh"  # the paper's; relu trains faster

    def problems(self) -> list[str]:
        if self.activation not in ("tanh", "relu"):
            return [f"model.activation={self.activation!r} is not allowed: tanh or relu"]
        return []


@register("lenet", LeNetConfig)
def build(cfg: LeNetConfig, pixels: Pixels) -> keras.Model:
    import keras

    image = pixels.input()
    x = keras.layers.Reshape((28, 28, 1), name="channels")(pixels.scaled(image))
    x = keras.layers.ZeroPadding2D(2, name="pad")(x)
    x = keras.layers.Conv2D(6, 5, activation=cfg.activation, name="c1")(x)
    x = keras.layers.AveragePooling2D(2, name="s2")(x)
    x = keras.layers.Conv2D(16, 5, activation=cfg.activation, name="c3")(x)
    x = keras.layers.AveragePooling2D(2, name="s4")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(120, activation=cfg.activation, name="c5")(x)
    x = keras.layers.Dense(84, activation=cfg.activation, name="f6")(x)
    return keras.Model(image, keras.layers.Dense(10, name="logits")(x), name="lenet")

"""The classic Keras/TensorFlow tutorial network: flat 784 pixels -> Dense(512, relu) ->
Dropout -> Dense(10)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.models import ModelConfig, Pixels, register

if TYPE_CHECKING:
    import keras


@dataclass
class MlpConfig(ModelConfig):
    name: str = "mlp"
    hidden_units: int = 512
    dropout: float = 0.2

    def problems(self) -> list[str]:
        out = []
        if self.hidden_units < 1:
            out.append(f"model.hidden_units={self.hidden_units!r} is not allowed: an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout={self.dropout!r} is not allowed: a number in [0, 1)")
        return out


@register("mlp", MlpConfig)
def build(cfg: MlpConfig, pixels: Pixels) -> keras.Model:
    import keras

    image = pixels.input()
    x = keras.layers.Flatten(name="flat")(pixels.scaled(image))
    x = keras.layers.Dense(cfg.hidden_units, activation="relu", name="hidden")(x)
    x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(image, logits, name="mlp")

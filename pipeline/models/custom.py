"""Bring your own model without forking: `model=custom model.builder=my_pkg.my_module:build`.

The builder is any importable function returning a Keras model from raw pixels (uint8
[N, 28, 28]) to 10 class scores (logits); `model.args` are its keyword arguments. It owns its
preprocessing (data.normalize does not apply). It trains, checkpoints, resumes, evaluates and
exports like a built-in model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from pipeline.errors import ConfigError
from pipeline.models import ModelConfig, Pixels, register

if TYPE_CHECKING:
    import keras


@dataclass
class CustomConfig(ModelConfig):
    name: str = "custom"
    builder: str = MISSING  # "package.module:function"
    args: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        if ":" not in self.builder:
            return [
                f"model.builder={self.builder!r} is not allowed: package.module:function, "
                "e.g. my_models.small:build"
            ]
        return []


def load_builder(spec: str) -> Any:
    module_name, _, function = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of user code is a config mistake
        raise ConfigError(
            f"model.builder={spec}: cannot import {module_name} ({type(exc).__name__}: {exc})"
        ) from exc
    builder = getattr(module, function, None)
    if not callable(builder):
        raise ConfigError(f"model.builder={spec}: {module_name} has no function {function}")
    return builder


@register("custom", CustomConfig)
def build(cfg: CustomConfig, pixels: Pixels) -> keras.Model:
    builder = load_builder(cfg.builder)
    try:
        return builder(**dict(cfg.args))
    except Exception as exc:
        raise ConfigError(
            f"model.builder={cfg.builder} failed: {type(exc).__name__}: {exc}"
        ) from exc

"""Compose a command line's config with Hydra's compose API and check it, without TensorFlow.

Hydra's own errors are long and multi-line; users get one line naming the key and what is
allowed instead (ConfigError, exit code 2).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from pipeline.config import Config, to_config, validate
from pipeline.errors import ConfigError


def conf_dir() -> Path:
    """The config directory every command composes from; the one place that knows where it is.

    A checkout keeps it at its top, conf/ beside the package directory (an editable install
    reads it there). A wheel carries it inside the package, site-packages/pipeline/conf
    (pyproject.toml maps conf/ to the package `pipeline.conf`). No copy of conf/ is kept in
    pipeline/ in the checkout.
    """
    packaged = Path(__file__).resolve().parent / "conf"
    checkout = packaged.parent.parent / "conf"
    if not (packaged / "config.yaml").is_file() and (checkout / "config.yaml").is_file():
        return checkout
    return packaged  # if missing too, Hydra names it: "Primary config directory not found"


CONF_DIR = conf_dir()


@contextlib.contextmanager
def initialize(config_dir: str | None = None) -> Iterator[None]:
    """Hydra's compose API on the search path `pipeline <command>` gets: CONF_DIR, then the
    user's `--config-dir DIR` (their own presets, e.g. DIR/experiment/mine.yaml) where
    hydra.main puts it, after the package's configs and before the structured schemas."""
    if config_dir is None:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield
        return
    # What initialize_config_dir does, plus the one entry hydra.main adds for --config-dir
    # (hydra/_internal/utils.py, _run_hydra).
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    version.setbase("1.3")
    search_path = create_config_search_path(str(CONF_DIR))
    search_path.prepend(
        provider="command-line",
        path=f"file://{os.path.abspath(config_dir)}",
        anchor=SearchPathQuery(provider="schema"),
    )
    backup = get_gh_backup()
    try:
        Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)
        yield
    finally:
        restore_gh_from_backup(backup)


def _keys_of(path: str) -> list[str]:
    """The keys beside `path` in the schema (for "did you mean" hints)."""
    node: object = Config()
    for part in path.split(".")[:-1]:
        node = getattr(node, part, None)
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def explain(exc: Exception) -> str:
    """One line from Hydra's or OmegaConf's exception chain."""
    cause = exc.__cause__ or exc
    if isinstance(exc, MissingConfigException):
        group = re.search(r"Could not find '([^']+)/([^/']+)'", str(exc))
        # Schemas registered for the YAML files to extend are not choices of their own.
        options = [
            o for o in re.findall(r"^\t(\S+)$", str(exc), flags=re.M) if not o.endswith("_schema")
        ]
        if group:
            message = (
                f"{group.group(1)}={group.group(2)} is not a config option; available: "
                f"{', '.join(options)}"
            )
            if group.group(1) == "hydra/launcher":  # the plugins are an optional extra
                message += (
                    ". The joblib and submitit launchers come with: "
                    "pip install 'pipeline[launchers]'"
                )
            return message
        return str(exc).splitlines()[0]
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        key = getattr(cause, "full_key", None) or "?"
        known = _keys_of(key)
        hint = f" (known keys there: {', '.join(known)})" if known else ""
        return f"{key} is not a config key{hint}. See: python -m pipeline train --cfg job"
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or "?"
        first = str(cause).splitlines()[0]
        choice = re.search(r"Invalid value '(.*)', expected one of \[(.*)\]", first)
        if choice:
            return f"{key}={choice.group(1)!r} is not allowed: one of {choice.group(2)}"
        wanted = re.search(r"Value '(.*)' of type .* could not be converted to (\w+)", first)
        if wanted:
            return f"{key}={wanted.group(1)!r} is not allowed: expected {wanted.group(2).lower()}"
        return f"{key}: {first}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def compose_and_check(overrides: list[str], config_dir: str | None = None) -> Path:
    """Compose, type-check and range-check; return the run directory the command maps to.
    `config_dir`: the user's --config-dir, searched after the package's configs (as by Hydra)."""
    try:
        with initialize(config_dir):
            composed = compose("config", overrides=overrides, return_hydra_config=True)
            run_dir = Path(str(composed.hydra.run.dir))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(explain(exc)) from exc
    try:
        cfg = to_config(composed)
    except OmegaConfBaseException as exc:
        raise ConfigError(explain(exc)) from exc
    except TypeError as exc:  # a key added with +key=... that the schema does not have
        raise ConfigError(
            f"unknown config key ({exc}). See: python -m pipeline train --cfg job"
        ) from exc
    validate(cfg)
    return run_dir

"""Compose a command line's config with Hydra's compose API and check it, without TensorFlow.

Hydra's own errors are long and multi-line; users get one line naming the key and what is
allowed instead (ConfigError, exit code 2).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra import compose
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, open_dict
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
def initialize(config_dir: str | None = None, config_path: str | None = None) -> Iterator[None]:
    """Hydra's compose API on the search path `pipeline <command>` gets: the primary config
    directory (CONF_DIR, or `--config-path/-cp DIR` resolved as hydra.main resolves it for
    pipeline/cli.py), then the user's `--config-dir DIR` (their own presets, e.g.
    DIR/experiment/mine.yaml) where hydra.main puts it, after the primary configs and before
    the structured schemas."""
    # What initialize_config_dir does, with the search path hydra.main builds
    # (hydra/_internal/utils.py, _run_hydra).
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import compute_search_path_dir, create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.utils import validate_config_path
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    version.setbase("1.3")
    primary: str | None = str(CONF_DIR)
    if config_path is not None:
        validate_config_path(config_path)
        primary = compute_search_path_dir(None, "pipeline.cli", config_path)
    search_path = create_config_search_path(primary)
    if config_dir is not None:
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
    if str(exc).startswith("Ambiguous value for argument"):
        return (
            f"{one_line(exc)}: sweep it with -m (--multirun), write a list as key=[a,b], or "
            "quote a string: key='a,b'"
        )
    return one_line(exc)


def one_line(exc: BaseException) -> str:
    """The first line of a message; a list Hydra prints below it, one tab-indented item a
    line ("available : \n\tbash\n\tfish"), is joined onto it."""
    lines = str(exc).splitlines()
    if not lines:
        return type(exc).__name__
    items = [line.strip() for line in lines[1:] if line.startswith("\t") and line.strip()]
    if items:
        return f"{lines[0].rstrip(' :')}: {', '.join(items)}"
    return lines[0]


def compose_and_check(
    overrides: list[str],
    config_dir: str | None = None,
    config_name: str | None = None,
    config_path: str | None = None,
) -> Path:
    """Compose, type-check and range-check; return the run directory the command maps to.
    `config_dir`: the user's --config-dir, searched after the primary configs (as by Hydra);
    `config_name`, `config_path`: --config-name/-cn and --config-path/-cp."""
    try:
        with initialize(config_dir, config_path):
            composed = _compose(config_name, overrides)
            run_dir = Path(str(composed.hydra.run.dir))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(explain(exc)) from exc
    _check(composed)
    return run_dir


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def check_sweep(
    overrides: list[str],
    config_dir: str | None = None,
    config_name: str | None = None,
    config_path: str | None = None,
) -> int:
    """Validate a multirun's overrides before any job starts; return the number of jobs
    (the basic sweeper's; an interval counts as one).

    Every override grammar Hydra accepts is expanded as Hydra's basic sweeper expands it
    (`a,b`, `range()`, `choice()`, `glob()` with the config loader, `tag()`, `sort()`,
    `shuffle()`), including the sweeper's `hydra.sweeper.params` from the config. A sweep is
    checked key by key, not combination by combination: the job made of every key's first
    value is composed and validated, then each further value of each swept key once, with the
    other keys at their first value. That is linear in the number of values, not in the
    number of jobs (the product), so a sweep of any size is checked in about a second per
    few hundred values and never materialized. A value of a config group (`model=cnn,mlp`)
    changes the composition and is composed on its own; a plain value (`fit.epochs=1,2`) is
    set on the composed job as Hydra's override would be, then type- and range-checked.
    What this does not see is a problem of one particular combination of values of two
    keys; each job still validates its config when it starts, and a failed job does not
    stop the others. `interval()` is for sweeper plugins (e.g. Optuna): the basic sweeper
    refuses it, and so does this check; with another sweeper its intervals are left to it.
    """
    try:
        with initialize(config_dir, config_path):
            return _check_sweep(config_name, overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(explain(exc)) from exc


def _compose(config_name: str | None, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name or "config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError):
        raise  # explained by the caller
    except Exception as exc:  # Hydra's or OmegaConf's internals failing on an odd override
        given = " ".join(o for o in overrides if not o.startswith("command="))
        raise ConfigError(
            f"cannot compose the config from {given or 'the defaults'} "
            f"({type(exc).__name__}: {one_line(exc)})"
        ) from exc


def _check(composed: DictConfig) -> None:
    """Type- and range-check a composed config (with or without its `hydra` node)."""
    try:
        cfg = to_config(composed)
    except OmegaConfBaseException as exc:
        raise ConfigError(explain(exc)) from exc
    except TypeError as exc:  # a key added with +key=... that the schema does not have
        raise ConfigError(
            f"unknown config key ({exc}). See: python -m pipeline train --cfg job"
        ) from exc
    validate(cfg)


def _sweep_values(parser: OverridesParser, overrides: list[str]) -> dict[str, list[Override]]:
    """Each key's overrides in the order a job list would take them (as BasicSweeper.
    split_arguments: keyed by the key element, a later override of a key replacing an
    earlier one). Enumerable sweeps are expanded (a list of values, not of combinations);
    an interval is left as its one Override."""
    by_key: dict[str, list[Override]] = {}
    for override in parser.parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            by_key[key] = [override]
        elif not override.is_discrete_sweep():
            by_key[key] = [override]
        else:
            values = [
                parser.parse_override(f"{key}={value}")
                for value in override.sweep_string_iterator()
            ]
            if not values:
                hint = (
                    ": glob() selects options of a config group (e.g. model=glob(*))"
                    if override.value_type == ValueType.GLOB_CHOICE_SWEEP
                    else ""
                )
                raise ConfigError(f"{override.input_line} gives no values to sweep{hint}")
            by_key[key] = values
    return by_key


def _naming(line: str, message: str) -> str:
    """A message about one value of a sweep, saying which value when it does not."""
    return message if message.startswith(line) else f"{line}: {message}"


def _check_sweep(config_name: str | None, overrides: list[str]) -> int:
    loader = GlobalHydra.instance().config_loader()
    parser = OverridesParser.create(config_loader=loader)
    by_key = _sweep_values(parser, overrides)
    enumerable = {k: v for k, v in by_key.items() if not v[0].is_sweep_override()}
    base = _compose(config_name, [str(v[0].input_line) for v in enumerable.values()])
    sweeper = base.hydra.sweeper
    if sweeper.get("_target_") == BASIC_SWEEPER:
        params = sweeper.get("params") or {}
        if params:  # the sweeper's own params come first, as in BasicSweeper.sweep
            by_key = _sweep_values(parser, [f"{k}={v}" for k, v in params.items()] + overrides)
        for values in by_key.values():
            if values[0].is_sweep_override():  # interval(): not discrete
                assert values[0].value_type is not None
                raise ConfigError(
                    f"{values[0].input_line}: BasicSweeper does not support sweep type "
                    f"{values[0].value_type.name}; interval() needs a sweeper plugin such as "
                    "Optuna's. Sweep with a,b,c, range(), choice() or glob()"
                )
        enumerable = by_key
        if params:
            base = _compose(config_name, [str(v[0].input_line) for v in enumerable.values()])
    _check(base)

    repository = getattr(loader, "repository", None)
    first = [str(v[0].input_line) for v in enumerable.values()]
    job = copy.deepcopy(base)
    with open_dict(job):
        del job["hydra"]
    for index, values in enumerate(enumerable.values()):
        if len(values) < 2:
            continue
        override = values[0]
        structural = (
            override.is_hydra_override()
            or override.is_delete()
            or override.package is not None
            or repository is None
            or repository.group_exists(override.key_or_group)
        )
        if structural:  # another config of a group: compose the job
            for value in values[1:]:
                line = str(value.input_line)
                try:
                    _check(_compose(config_name, [*first[:index], line, *first[index + 1 :]]))
                except (HydraException, OmegaConfBaseException, ValueError) as exc:
                    raise ConfigError(_naming(line, explain(exc))) from exc
                except ConfigError as exc:
                    raise ConfigError(_naming(line, str(exc))) from exc
            continue
        for value in [*values[1:], override]:  # set each value, then the first one back
            plain = parser.parse_override(
                f"++{value.key_or_group}={value.get_value_element_as_str()}"
            )
            ConfigLoaderImpl._apply_overrides_to_config([plain], job)
            if value is not override:
                _check(job)
    return math.prod(len(v) for v in by_key.values())

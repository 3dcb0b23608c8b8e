"""Config errors: one line, exit code 2, before TensorFlow is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli
from hydra import compose, initialize_config_dir

from pipeline.configcheck import compose_and_check
from pipeline.errors import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fit.epochs=abc", "error: fit.epochs='abc' is not allowed: expected integer"),
        ("fit.epochs=-1", "error: fit.epochs=-1 is not allowed: an integer >= 1"),
        ("data.train_size=0", "error: data.train_size=0 is not allowed: an integer >= 1"),
        ("fit.epochz=3", "error: fit.epochz is not a config key (known keys there: epochs,"),
        (
            "model=resnet",
            "error: model=resnet is not a config option; available: cnn, custom, lenet, mlp",
        ),
        ("+foo=1", "error: foo is not a config key."),
        ("checkpoint.keep=0", "error: checkpoint.keep=0 is not allowed: an integer >= 1"),
        (
            "evaluate.checkpoint=worst",
            "error: evaluate.checkpoint='worst' is not allowed: latest, best or a checkpoint's "
            "step number",
        ),
        ("model.dropout=1.5", "error: model.dropout=1.5 is not allowed: a number in [0, 1)"),
    ],
)
def test_bad_override_is_one_clear_line(tmp_path: Path, override: str, message: str) -> None:
    result = cli(["train", override], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()  # nothing was created


def test_unknown_command_and_stage_on_missing_run(tmp_path: Path) -> None:
    result = cli(["trian"], tmp_path)
    assert result.returncode == 2 and "unknown command 'trian'" in result.stderr
    result = cli(["evaluate", "run.name=nope"], tmp_path)
    assert result.returncode == 2
    assert (
        "no run at outputs/nope. Start it with: python -m pipeline train run.name=nope"
        in result.stderr
    )


def test_run_directory_is_derived_from_identity_overrides() -> None:
    run_dir = compose_and_check(
        [
            "model=mlp",
            "fit.epochs=3",
            "data.train_size=2000",
            "seed=7",
            "data.path=/somewhere/mnist.npz",
        ]
    )
    # fit.epochs and data.path do not change what the run is, so they are not in its name.
    assert run_dir == Path("outputs/data.train_size=2000,model=mlp,seed=7")
    assert compose_and_check([]) == Path("outputs/default")
    assert compose_and_check(["run.name=mine", "model=mlp"]) == Path("outputs/mine")
    assert compose_and_check(["experiment=tutorial"]) == Path("outputs/experiment=tutorial")


def test_identity_rule_is_one_rule_for_every_key_of_the_schema() -> None:
    """The run directory's name, the resume check (run.json's identity) and the HParams table
    follow config.COMPATIBLE_KEYS for every key of the schema (every model's included); no
    second list exists (Hydra's exclude_keys is not used)."""
    from pipeline import config

    assert "exclude_keys" not in (CONF / "config.yaml").read_text()
    for model in ("cnn", "mlp", "lenet", "custom"):
        overrides = [f"model={model}"] + (["model.builder=a:b"] if model == "custom" else [])
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = config.to_config(compose("config", overrides=overrides))
        identity = config.identity(cfg)
        for key in config.schema_defaults(cfg):
            named = config.run_name(None, [f"{key}=1"]) != "default"
            assert named == config.is_identity_key(key), key
            if key != "fit.epochs":  # also identity under stretched schedules (cosine, onecycle)
                assert (key in identity) == config.is_identity_key(key), key
            assert config.is_hparam(key) or not config.is_identity_key(key), key
    # A key added to export.* (or any compatible group) never renames existing runs.
    assert config.run_name(None, ["export.some_future_key=1", "checkpoint.keep=9"]) == "default"


def test_tutorial_experiment_is_the_classic_setup() -> None:
    from hydra import compose, initialize_config_dir

    from pipeline.configcheck import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=tutorial"])
    assert cfg.model.name == "mlp" and cfg.model.hidden_units == 512
    assert cfg.model.dropout == 0.2
    assert (cfg.data.train_size, cfg.data.test_size) == (2000, 2000)


def test_config_check_does_not_import_tensorflow() -> None:
    code = (
        "import sys\nfrom pipeline.configcheck import compose_and_check\n"
        "from pipeline.errors import ConfigError\n"
        "try:\n    compose_and_check(['fit.epochs=abc'])\nexcept ConfigError:\n    pass\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_multirun_sweeps_are_validated_up_front(tmp_path: Path) -> None:
    result = cli(["train", "-m", "fit.epochs=1,-2"], tmp_path)
    assert result.returncode == 2
    assert "fit.epochs=-2 is not allowed" in result.stderr


def test_validate_rejects_a_validation_fraction_of_one() -> None:
    with pytest.raises(ConfigError, match=r"data.val_fraction=1.0 is not allowed: a number in"):
        compose_and_check(["data.val_fraction=1.0"])


def test_hydra_cfg_job_prints_the_config(tmp_path: Path) -> None:
    result = cli(["train", "--cfg", "job", "model=mlp"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hidden_units: 512" in result.stdout and "command: train" in result.stdout


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.name=..", "run.name"),
        ("run.name=.", "run.name"),
        ("run.name=.hidden", "run.name"),
        ("run.name=a/b", "run.name"),
        ("run.name=" + "x" * 101, "run.name"),
        ("export.model_name=..", "export.model_name"),
        ("export.model_name=../elsewhere", "export.model_name"),
    ],
)
def test_names_that_would_leave_the_run_directory_are_refused(
    tmp_path: Path, override: str, key: str
) -> None:
    result = cli(["train", override, "run.restart=true"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {key}="), result.stderr
    assert "a plain name" in result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())

"""Installs like a real package: `--version`, the user's own presets with `--config-dir`, and a
wheel that carries conf/ (scripts/wheel_check.sh installs and runs that wheel in CI)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import ROOT, cli

from pipeline.configcheck import CONF_DIR, compose_and_check, initialize
from pipeline.errors import ConfigError

# A user's own presets, outside the package: a model of their own, an experiment that uses it.
TINY_MODEL = "defaults:\n  - mlp_schema\nname: mlp\nhidden_units: 7\ndropout: 0.0\n"
EXPERIMENT = """\
# @package _global_
defaults:
  - override /data: sample
  - override /model: tiny
run:
  name: mine
fit:
  epochs: {epochs}
"""


def user_conf(tmp_path: Path, epochs: int = 1) -> Path:
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "model" / "tiny.yaml").write_text(TINY_MODEL)
    # Named like a package preset: it must not replace conf/model/mlp.yaml.
    (conf / "model" / "mlp.yaml").write_text(TINY_MODEL.replace("7", "3"))
    (conf / "experiment" / "mine.yaml").write_text(EXPERIMENT.format(epochs=epochs))
    return conf


def test_version_prints_the_versions_without_starting_tensorflow() -> None:
    expected = [
        f"pipeline {version('pipeline')}",
        f"TensorFlow {version('tensorflow')}",
        f"Keras {version('keras')}",
        f"Hydra {version('hydra-core')}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == expected
    code = (
        "import sys\nfrom pipeline.__main__ import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False False"
    usage = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True)
    assert b"--version" in usage.stdout and b"--config-dir" in usage.stdout


def test_console_script_is_python_m_pipeline() -> None:
    script = Path(sys.executable).parent / "pipeline"
    assert script.is_file(), (
        f"no console script {script}: reinstall with pip install -e '.[test]' "
        "(pyproject.toml declares [project.scripts] pipeline)"
    )
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("pipeline "), out.stderr


def test_conf_is_read_from_the_checkout_not_copied_into_the_package() -> None:
    # In a checkout (the editable install) conf/ is read where users edit it; only a wheel
    # carries it inside the package.
    assert CONF_DIR == (ROOT / "conf").resolve()
    assert not (ROOT / "pipeline" / "conf").exists()


def test_precheck_composes_with_the_user_config_dir(tmp_path: Path) -> None:
    conf = str(user_conf(tmp_path))
    assert compose_and_check(["command=train", "experiment=mine"], conf) == Path("outputs/mine")
    assert compose_and_check(["model=tiny"], conf) == Path("outputs/model=tiny")
    with pytest.raises(ConfigError, match="model=tiny is not a config option"):
        compose_and_check(["model=tiny"])  # without the directory, the preset is unknown
    from hydra import compose

    with initialize(conf):
        assert compose("config", overrides=["model=tiny"]).model.hidden_units == 7
        # The package's presets come first: a file of the same name does not replace them.
        assert compose("config", overrides=["model=mlp"]).model.hidden_units == 512


@pytest.mark.parametrize("form", ["--config-dir DIR", "--config-dir=DIR", "-cd DIR"])
def test_config_dir_on_the_command_line(tmp_path: Path, form: str) -> None:
    conf = str(user_conf(tmp_path))
    args = form.replace("DIR", conf).split()
    result = cli(["train", *args, "experiment=mine", "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr
    # Hydra composed the user's experiment and model, not just the pre-check.
    assert "hidden_units: 7" in result.stdout
    assert "name: mine" in result.stdout


def test_config_dir_presets_are_checked_before_hydra_starts(tmp_path: Path) -> None:
    conf = str(user_conf(tmp_path, epochs=-1))
    result = cli(["train", "--config-dir", conf, "experiment=mine"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: fit.epochs=-1 is not allowed"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()  # the pre-check stopped it, not Hydra

    result = cli(["train", "--config-dir", str(tmp_path / "nowhere")], tmp_path)
    assert result.returncode == 2
    assert "no such directory" in result.stderr
    result = cli(["train", "--config-dir"], tmp_path)
    assert result.returncode == 2 and "needs a directory" in result.stderr


def test_missing_launcher_names_the_extra(tmp_path: Path) -> None:
    result = cli(["train", "hydra/launcher=nosuch"], tmp_path)
    assert result.returncode == 2
    assert "hydra/launcher=nosuch is not a config option" in result.stderr
    assert "pip install 'pipeline[launchers]'" in result.stderr


def test_wheel_carries_conf_the_sample_and_every_module(tmp_path: Path) -> None:
    # Built from a copy of what the build reads, so nothing lands in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("pipeline", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp_path), "."],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("pipeline-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
        metadata = whl.read(f"{dist_info}/METADATA").decode()

    conf = ROOT / "conf"
    yamls = {f"pipeline/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
    assert "pipeline/conf/config.yaml" in yamls
    assert {n for n in names if n.startswith("pipeline/conf/")} == yamls
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "pipeline").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules - names == set(), "add the subpackage to [tool.setuptools] packages"
    assert "pipeline/sample/mnist_sample.npz" in names
    templates = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline" / "templates").iterdir()
    }
    assert "pipeline/templates/report.html" in templates
    assert templates - names == set(), "add the template to [tool.setuptools.package-data]"
    assert not any(n.startswith("conf/") for n in names)
    assert "pipeline = pipeline.__main__:main" in entry_points
    for extra in ("launchers", "gpu", "dev", "test"):
        assert f"Provides-Extra: {extra}" in metadata
    launcher = [line for line in metadata.splitlines() if "hydra-joblib-launcher" in line]
    assert launcher and all('extra == "launchers"' in line for line in launcher)


@pytest.mark.parametrize("command", ["status", "report"])
def test_read_commands_print_help(tmp_path: Path, command: str) -> None:
    result = cli([command, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m pipeline {command}")
    assert not (tmp_path / "outputs").exists()

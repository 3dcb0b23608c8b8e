"""Hydra's command line through `python -m pipeline`: every override grammar and sweep size the
pre-check meets, Hydra's own options (-cd, -cn, -cp, --info, --resolve, -sc), and any error of
Hydra's as one line with exit code 2. Nothing here trains: each command stops at the pre-check,
at --cfg/--info, or at shell completion."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import cli

from pipeline.configcheck import CONF_DIR, check_sweep
from pipeline.errors import ConfigError


def one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single `error: ...` line of a failed command (no traceback, nothing else)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    stderr = result.stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def user_conf(tmp_path: Path, epochs: int = 7) -> Path:
    """A --config-dir with a primary config of its own (for -cn) and an experiment."""
    conf = tmp_path / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "mine.yaml").write_text(
        f"defaults:\n  - config\n  - _self_\n\nfit:\n  epochs: {epochs}\n"
    )
    (conf / "experiment" / "own.yaml").write_text(
        "# @package _global_\ndata:\n  train_size: 1234\n"
    )
    (conf / "sweepy.yaml").write_text(
        "defaults:\n  - config\n  - _self_\n\nhydra:\n  sweeper:\n    params:\n"
        "      fit.epochs: 1,0\n"
    )
    return conf


# --- sweeps: every grammar Hydra accepts --------------------------------------------------


def test_glob_over_a_plain_key_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    line = one_error_line(cli(["train", "-m", "seed=glob(*)"], tmp_path))
    assert "seed=glob(*) gives no values to sweep" in line
    assert "config group" in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("fit.epochs=2,1,0", "fit.epochs=0 is not allowed"),
        ("fit.epochs=range(3,-1,-1)", "fit.epochs=0 is not allowed"),
        ("fit.epochs=choice(2,0)", "fit.epochs=0 is not allowed"),
        ("fit.epochs=tag(short,choice(2,0))", "fit.epochs=0 is not allowed"),
        ("fit.epochs=sort(3,0,2)", "fit.epochs=0 is not allowed"),
        ("fit.epochs=shuffle(2,0,3)", "fit.epochs=0 is not allowed"),
        ("seed=1,abc", "seed='abc' is not allowed: expected integer"),
        ("model=glob(c*)", "model=custom: model.builder"),
        ("model=mlp,nope", "model=nope is not a config option"),
        ("seed=interval(0,1)", "BasicSweeper does not support sweep type INTERVAL_SWEEP"),
        ("seed=range(3,1)", "seed=range(3,1) gives no values to sweep"),
    ],
)
def test_every_sweep_grammar_is_checked_before_a_job_starts(
    tmp_path: Path, sweep: str, message: str
) -> None:
    line = one_error_line(cli(["train", "-m", sweep], tmp_path))
    assert message in line, line
    assert not (tmp_path / "outputs").exists()


def test_sweep_grammars_expand_as_hydra_expands_them() -> None:
    # glob: the group's options (the schemas are options of the group too, as for Hydra).
    assert (
        check_sweep(
            [
                "command=train",
                "model=glob(*,exclude=[custom,*_schema])",  # cnn, lenet, mlp
                "optimizer=glob(adam*)",  # adam, adam_cosine, adam_restarts
                "seed=shuffle(1,2,3)",
                "fit.epochs=sort(3,1,2)",
                "data.train_size=tag(small,choice(100,200))",
                "fit.batch_size=range(16,65,16)",  # 16, 32, 48, 64
            ]
        )
        == 3 * 3 * 3 * 3 * 2 * 4
    )


def test_a_sweep_is_checked_past_its_first_256_jobs(tmp_path: Path) -> None:
    # In job order the bad value comes after 300 good jobs.
    result = cli(["train", "-m", "fit.epochs=1,0", "seed=range(0,300)"], tmp_path, timeout=120)
    assert "fit.epochs=0 is not allowed" in one_error_line(result)
    assert not (tmp_path / "outputs").exists()


def test_a_sweep_of_any_size_is_checked_by_its_values_not_its_jobs() -> None:
    jobs = check_sweep(
        ["command=train", "seed=range(0,400)", "fit.batch_size=range(1,401)", "fit.epochs=1,2"]
    )
    assert jobs == 400 * 400 * 2  # 320,000 jobs, 802 values
    with pytest.raises(ConfigError, match=r"fit.batch_size=0 is not allowed"):
        check_sweep(["command=train", "seed=range(0,400)", "fit.batch_size=range(400,-1,-1)"])


def test_sweeper_params_of_the_config_are_checked(tmp_path: Path) -> None:
    conf = user_conf(tmp_path)
    line = one_error_line(cli(["train", "-m", "-cd", str(conf), "-cn", "sweepy"], tmp_path))
    assert "fit.epochs=0 is not allowed" in line


# --- Hydra's options --------------------------------------------------------------------


def test_config_name_in_the_config_dir_is_what_the_precheck_composes(tmp_path: Path) -> None:
    conf = user_conf(tmp_path)
    result = cli(
        ["train", "-cd", str(conf), "-cn", "mine", "experiment=own", "--cfg", "job"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "epochs: 7" in result.stdout and "train_size: 1234" in result.stdout

    bad = user_conf(tmp_path / "bad", epochs=-1)
    line = one_error_line(cli(["train", "--config-dir", str(bad), "--config-name=mine"], tmp_path))
    assert line.startswith("error: fit.epochs=-1 is not allowed"), line
    assert not (tmp_path / "outputs").exists()

    line = one_error_line(cli(["train", "-cn", "nope"], tmp_path))
    assert "Cannot find primary config 'nope'" in line


def test_config_dir_experiments_are_swept_and_checked(tmp_path: Path) -> None:
    conf = user_conf(tmp_path)
    line = one_error_line(cli(["train", "-m", "-cd", str(conf), "experiment=own,nope"], tmp_path))
    assert "experiment=nope is not a config option; available: " in line
    assert "own" in line and "tutorial" in line


def test_config_path_replaces_the_primary_config_directory(tmp_path: Path) -> None:
    conf = tmp_path / "copy"
    shutil.copytree(CONF_DIR, conf)
    config = conf / "config.yaml"
    config.write_text(config.read_text().replace("\nseed: 0\n", "\nseed: 5\n"))
    result = cli(["train", "-cp", str(conf), "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "seed: 5" in result.stdout

    config.write_text(config.read_text().replace("\nseed: 5\n", "\nseed: -1\n"))
    line = one_error_line(cli(["train", "--config-path", str(conf), "--cfg", "job"], tmp_path))
    assert line.startswith("error: seed=-1 is not allowed"), line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--info"], "Defaults Tree"),
        (["--info", "defaults", "model=mlp"], "model/mlp"),
        (["model=mlp", "-i", "searchpath"], "file://"),
    ],
)
def test_info_reaches_hydra(tmp_path: Path, args: list[str], expected: str) -> None:
    result = cli(["train", *args], tmp_path)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("option", "expected"),
    [("--help", "== Configuration groups =="), ("--hydra-help", "Hydra (1.")],
)
def test_help_reaches_hydra(tmp_path: Path, option: str, expected: str) -> None:
    result = cli(["train", option, "model=mlp"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_resolve_with_cfg_prints_the_resolved_config_and_writes_nothing(tmp_path: Path) -> None:
    result = cli(["train", "--cfg", "all", "--resolve", "run.name=abc"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dir: outputs/abc" in result.stdout
    assert not (tmp_path / "outputs").exists()
    line = one_error_line(cli(["train", "--resolve"], tmp_path))
    assert "--resolve only works with --cfg" in line


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_installs_for_the_pipeline_command(tmp_path: Path, shell: str) -> None:
    result = cli(["train", "-sc", f"install={shell}"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout and "pipeline" in result.stdout
    result = cli(["train", "--shell-completion", f"uninstall={shell}"], tmp_path)
    assert result.returncode == 0, result.stderr


def test_shell_completion_query_completes_the_overrides_after_the_command(tmp_path: Path) -> None:
    result = cli(["-sc", "query=bash"], tmp_path, env={"COMP_LINE": "pipeline train model="})
    assert result.returncode == 0, result.stderr
    assert "model=mlp" in result.stdout.split()


# --- errors: one line, exit code 2 --------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "--cfg", "job"], "--multirun and --cfg cannot be combined"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--cfg", "nope"], "argument --cfg/-c: invalid choice: 'nope'"),
        (["-sc", "install=tcsh"], "No completion plugin for 'tcsh' found, available: bash"),
        (["-sc"], "Expecting one subcommand"),
        (["seed=1,2"], "Ambiguous value for argument 'seed=1,2': sweep it with -m"),
        (["--cfg", "hydra", "--resolve"], "Interpolation key 'run.outputs' not found"),
        (["hydra.sweeper.params={seed:'1,2'}", "--cfg", "job"], "cannot compose the config"),
    ],
)
def test_a_hydra_error_is_one_line_and_exit_code_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    line = one_error_line(cli(["train", *args], tmp_path))
    assert message in line, line


# --- experiments ------------------------------------------------------------------------


def test_an_unknown_experiment_is_an_error_listing_the_experiments(tmp_path: Path) -> None:
    line = one_error_line(cli(["train", "experiment=tutorail", "--cfg", "job"], tmp_path))
    assert line == (
        "error: experiment=tutorail is not a config option; available: fast, "
        "keras_convnet, tutorial"
    )
    result = cli(["train", "--cfg", "job"], tmp_path)  # no experiment at all still works
    assert result.returncode == 0, result.stderr
    assert "command: train" in result.stdout


def test_output_read_by_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """`pipeline train -sc install=bash | head -1`: the reader closes the pipe; the command stops
    with 141 (128 + SIGPIPE) as shell tools do, not with a disk-error message."""
    import subprocess
    import sys

    for args in (["train", "-sc", "install=bash"], ["status"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.close()  # nobody reads: the first write fails with EPIPE
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 141, stderr
        assert "error" not in stderr and "Traceback" not in stderr, stderr

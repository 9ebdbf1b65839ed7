"""The error messages: the library names Python arguments, the CLI names its flags (one table,
``cli._errors.FLAGS``), and one positive-integer check serves every caller."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import click
import numpy as np
import pytest
from helpers.cli import assert_clean_failure, bstab
from torch import nn

from basis_stability.analysis import EngineConfig
from basis_stability.cli import main
from basis_stability.cli._errors import FLAGS, NOT_HERE, flag_for, render
from basis_stability.errors import (
    ConfigError,
    Message,
    RunExistsError,
    expected,
    names_in,
    non_negative_int,
    positive_int,
)
from basis_stability.exporting import export_snapshot
from basis_stability.lowrank.surgery import KEPT_FIRST, KEPT_LAST, kept_all_message
from basis_stability.recording.schedules import every, every_epoch, logspaced, parse_schedule
from basis_stability.training import TrainConfig
from basis_stability.zoo import check_pair

PACKAGE = Path(__file__).resolve().parents[1] / "basis_stability"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


# ---------------------------------------------------------------------- errors carry names
def test_expected_records_its_argument_and_argument_adds_more():
    msg = expected("delay", ">= 0 steps", -1, "Use `beta=0.15` too.")
    assert isinstance(msg, Message) and msg.arguments == ("delay",)
    assert ConfigError(msg).arguments == ("delay",)
    assert ConfigError(msg, argument="beta").arguments == ("delay", "beta")
    assert ConfigError("plain", argument=("a", "b", "a")).arguments == ("a", "b")
    assert ConfigError("plain").arguments == ()
    assert names_in(msg) == ("delay",) and names_in("plain") == ()


def test_an_error_keeps_its_names_through_pickling():  # the analysis pool pickles errors
    err = pickle.loads(pickle.dumps(RunExistsError(expected("path", "new", "x", "Fix."))))
    assert isinstance(err, RunExistsError) and err.arguments == ("path",)
    assert str(err) == "Expected `path` to be new but got 'x'. Fix."


def test_an_empty_fix_leaves_no_trailing_space():
    assert expected("lag", "whole", "2.5", "") == "Expected `lag` to be whole but got '2.5'."


# ---------------------------------------------------------------------- library vs CLI
def test_a_library_error_names_the_python_argument_and_the_cli_its_flag(tiny_run, tmp_path):
    out = tmp_path / "weights.txt"
    with pytest.raises(ConfigError) as info:
        export_snapshot(tiny_run, out)
    text = str(info.value)
    assert "Expected `out_path`" in text and '`format="safetensors"`' in text
    assert not FLAG.search(text), text

    result = bstab("export", tiny_run, "-o", out)
    line = assert_clean_failure(result, "Expected `--output`", "`--format safetensors`")
    assert "out_path" not in line and "format=" not in line


def test_a_model_on_a_dataset_of_another_task_names_both_ways(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        check_pair("cnn", "co2")
    text = str(info.value)
    assert '`model="cnn"`' in text and '`model="forecaster"` with `dataset="co2"`' in text
    assert not FLAG.search(text), text

    result = bstab("train", "--model", "cnn", "--dataset", "co2", "-o", tmp_path / "r.h5")
    assert_clean_failure(result, "`--model cnn`", "`--model forecaster` with `--dataset co2`")


def test_a_schedule_error_names_schedule_in_python_and_the_flag_in_the_cli(tmp_path: Path):
    with pytest.raises(ConfigError, match=r'Expected `schedule`.*`schedule="every:10"`'):
        parse_schedule("sometimes", 10)
    args = ("--model", "mlp", "--epochs", "1", "--no-progress", "-o", tmp_path / "r.h5")
    result = bstab("record", *args, "--schedule", "sometimes")
    assert_clean_failure(result, "Expected `--schedule`", "`--schedule every:10`")


# ---------------------------------------------------------------------- the rendering
def test_render_touches_only_the_named_arguments_of_the_running_command():
    text = 'Expected `delay` to be x. Use `device="cpu"`, `kmax` or `bstab train --auto`.'
    assert render(text, "train", ("delay", "device", "kmax")) == (
        "Expected `--delay` to be x. Use `--device cpu`, `kmax` or `bstab train --auto`."
    )
    assert render(text, "train", ("delay",)).startswith("Expected `--delay` to be x. Use `device")
    assert render(text, "inspect", ("delay",)) == text  # inspect has no --delay
    assert render(text, None, ("delay",)) == text  # not inside a command
    assert render(text, "train") == render(text, "train", ("delay", "device", "kmax"))


def test_a_clause_naming_what_the_command_cannot_do_is_left_out():
    text = (
        "Expected `path` to be a new file but runs/r.h5 already exists. Pass `mode='overwrite'` "
        "to replace it, `mode='append'` to resume it, or choose another path; nothing was written."
    )
    assert render(text, "record", ("path", "mode")) == (
        "Expected `--output` to be a new file but runs/r.h5 already exists. Pass `--force` "
        "to replace it, or choose another path; nothing was written."
    )
    assert render(text, None, ("path", "mode")) == text  # Python keeps every choice
    assert render(text, "record", ("path",)) == text.replace("`path`", "`--output`")


@pytest.mark.parametrize(
    ("command", "name", "value", "flag"),
    [
        ("train", "keep_last", "False", "--no-keep-last"),
        ("train", "keep_last", "True", "--keep-last"),
        ("train", "auto", None, "--auto/--no-auto"),
        ("record", "background", "False", "--no-background"),
        ("record", "mode", '"overwrite"', "--force"),
        ("train", "mode", "'overwrite'", "--force"),
        ("train", "mode", '"full"', "--mode full"),
        ("train", "mode", '"append"', NOT_HERE),  # resuming a run: train has no flag for it
        ("record", "mode", "'append'", NOT_HERE),
        ("export", "force", "True", "--force"),
        ("analyze", "lag", '"4ep"', "--lag 4ep"),
        ("analyze", "kmax", None, None),
    ],
)
def test_flag_for(command: str, name: str, value: str | None, flag: str | None):
    assert flag_for(command, name, value) == flag


def test_kept_all_layers_reads_as_flags_in_train():
    msg = kept_all_message(nn.Linear(4, 4), [("a", KEPT_FIRST), ("b", KEPT_LAST)])
    assert msg.arguments == ("keep_first", "keep_last")
    shown = render(msg, "train", msg.arguments)
    assert "`--keep-first` and `--keep-last`" in shown
    assert "`--no-keep-first` or `--no-keep-last`" in shown


def _options(command: click.Command) -> set[str]:
    return {
        name
        for param in command.params
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
    }


def test_every_command_has_a_table_and_every_flag_in_it_is_an_option_of_its_command():
    assert set(FLAGS) == set(main.commands)
    for command, table in FLAGS.items():
        options = _options(main.commands[command])
        for key, flag in table.items():
            assert re.fullmatch(r"[A-Za-z_]\w*(=\w+)?", key), (command, key)
            if flag is None:  # "no flag for this value": the name itself must have one
                assert key.partition("=")[0] in table, (command, key)
                continue
            if flag == NOT_HERE:  # a value the command cannot do: always one value
                assert "=" in key, (command, key)
                continue
            for part in flag.split("/"):
                assert part.split()[0] in options, f"bstab {command} has no {part}"


# ---------------------------------------------------------------------- no flags in the library
def _strings(tree: ast.AST):
    """Every string constant that is not a docstring, and whether it is a piece of an f-string."""
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    pieces = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node, id(node) in pieces


def test_library_messages_name_no_cli_flags():
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("cli/"):
            continue
        for node, in_fstring in _strings(ast.parse(path.read_text())):
            flags = FLAG.findall(node.value)
            if in_fstring and re.search(r"(?<![\w-])--$", node.value):  # f"(--{what})"
                flags.append(node.value[-8:])
            if flags:
                found.setdefault(rel, []).append(f"{node.lineno}: {flags}")
    assert found == {}


# ---------------------------------------------------------------------- the one integer check
@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(1)])
def test_positive_int_accepts_integers_and_returns_an_int(value):
    got = positive_int("n", value, "Use 1.")
    assert got == value and type(got) is int


@pytest.mark.parametrize("value", [0, -2, True, False, 1.0, 2.5, "3", None, np.bool_(True)])
def test_positive_int_refuses_the_rest_with_the_template(value):
    with pytest.raises(ConfigError) as info:
        positive_int("n", value, "Use 1.")
    assert str(info.value) == f"Expected `n` to be a positive integer but got {value!r}. Use 1."
    assert info.value.arguments == ("n",)


def test_non_negative_int_takes_zero():
    assert non_negative_int("k", 0, "Use 0.") == 0
    with pytest.raises(ConfigError, match="a non-negative integer but got -1"):
        non_negative_int("k", -1, "Use 0.")


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda v: TrainConfig(epochs=v), "epochs"),
        (lambda v: TrainConfig(batch_size=v), "batch_size"),
        (lambda v: EngineConfig(jobs=v), "jobs"),
        (lambda v: EngineConfig(kmax=v), "kmax"),
        (lambda v: every(v), "n"),
        (lambda v: every_epoch(v), "steps_per_epoch"),
        (lambda v: logspaced(v, 100, 5), "first"),
        (lambda v: logspaced(1, 100, v), "num"),
    ],
)
@pytest.mark.parametrize("bad", [True, 0, "3"])
def test_every_positive_count_is_checked_the_same_way(build, name: str, bad):
    with pytest.raises(ConfigError, match=f"^Expected `{name}` to be a positive integer but got"):
        build(bad)


def test_train_config_checks_epochs_before_the_warmup_that_depends_on_it():
    with pytest.raises(ConfigError, match="Expected `epochs`"):  # was a leaked TypeError
        TrainConfig(epochs="40", warmup=1.0)

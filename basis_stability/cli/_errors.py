"""Turn the package's errors into clean one-line CLI failures, spelt in the CLI's flags.

The library's messages speak Python: they name the argument the caller passed in backticks
(`` `delay` ``) and give fixes as Python (`` `device="cpu"` ``, `` `background=False` ``).
:data:`FLAGS`, the one table from those names to this CLI's options, turns them into flags
when the CLI prints them (`` `--delay` ``, `` `--device cpu` ``, `` `--no-background` ``).

Why this shape, and not rewriting the prose: an error says which arguments it names
(:attr:`~basis_stability.errors.BstabError.arguments`, recorded by ``expected()`` and by
``argument=``), and only a backticked span that *is* one of them, alone (`` `name` ``) or with
a value (`` `name=value` ``), is replaced, by what the table says for the command that is
running. Nothing else in the message is touched: a span the table lacks (an argument with no
flag, such as `` `kmax` ``) keeps its Python spelling, which is still true, and a message that
names no argument is printed as it is. Where the library's text is not an error (the notes of
``bstab analyze``, the skip reasons of ``bstab record --list``) every argument of the table is
rendered, since that text carries no list of names.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable, Collection
from typing import Any

import click

from ..errors import BstabError

#: A :data:`FLAGS` entry for what a command cannot do: the clause of the fix naming it (from the
#: comma before it to the next comma, semicolon or period) is left out of the message.
NOT_HERE = ""

# the options record and train share (_options.training_options), and the run file they write
_TRAINING: dict[str, str | None] = {
    "model": "--model",
    "dataset": "--dataset",
    "epochs": "--epochs",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "optimizer": "--optimizer",
    "warmup": "--warmup",
    "lr_schedule": "--lr-schedule",
    "device": "--device",
    "path": "--output",
    "force": "--force",
    "mode=overwrite": "--force",
    "progress=False": "--no-progress",
}

# the options analyze, report and compare share (_options.analysis_options)
_ANALYSIS: dict[str, str | None] = {
    "lag": "--lag",
    "k": "--k",
    "tau": "--tau",
    "share": "--share",
    "beta_rule": "--beta-rule",
    "min_energy": "--min-energy",
    "target_share": "--target-share",
    "svd": "--svd",
    "method": "--method",
    "svd_dtype": "--svd-dtype",
    "chunk_mb": "--chunk-mb",
    "device": "--device",
    "jobs": "--jobs",
    "cache=False": "--no-cache",
}

#: ``{command: {python_argument: flag}}``. A key ``name=value`` is that one value (looked up
#: first, quotes dropped; None: the command has no flag for it, keep the Python spelling); a
#: flag ``--on/--off`` is a boolean pair (``name=True`` is ``--on``, ``name=False`` is
#: ``--off``); otherwise ``name=value`` becomes ``--flag value``.
FLAGS: dict[str, dict[str, str | None]] = {
    "record": {
        **_TRAINING,
        "mode=append": NOT_HERE,  # resuming a run file: record has no flag for it
        "schedule": "--schedule",
        "dtype": "--dtype",
        "include": "--include",
        "exclude": "--exclude",
        "types": "--types",
        "biases=False": "--no-biases",
        "background=False": "--no-background",
        "pattern": "--from-checkpoints",
    },
    "train": {
        **_TRAINING,
        "mode": "--mode",
        "mode=append": NOT_HERE,  # resuming a run file: train has no flag for it
        "delay": "--delay",
        "interval": "--interval",
        "beta": "--beta",
        "plan": "--plan",
        "auto": "--auto/--no-auto",
        "target_share": "--target-share",
        "preset": "--preset",
        "keep_first": "--keep-first/--no-keep-first",
        "keep_last": "--keep-last/--no-keep-last",
        "moments": "--moments",
        "export_path": "--output",
    },
    "analyze": {
        **_ANALYSIS,
        "out_dir": "--output",
        "plots=False": "--no-plots",
        "force": "--force",
        "follow": "--follow",
        "poll": "--poll",
        "idle_timeout": "--idle-timeout",
        "progress=False": "--no-progress",
    },
    "report": {
        **_ANALYSIS,
        "out": "--output",
        "force": "--force",
        "progress=False": "--no-progress",
    },
    "compare": {
        **_ANALYSIS,
        "out_dir": "--output",
        "force": "--force",
        "progress=False": "--no-progress",
    },
    "inspect": {"scan=False": "--no-scan"},
    "validate": {},
    "export": {
        "snapshot": "--snapshot",
        "format": "--format",
        "out_path": "--output",
        "layers": "--layers",
        "dtype": "--dtype",
        "force": "--force",
    },
}

# a backticked Python argument, alone or with a value: `delay`, `device="cpu"`, `force=True`
_SPAN = re.compile(r"`([A-Za-z_]\w*)(?:=([^`\s][^`]*))?`")
# a clause after a comma holding one such span, up to the next comma, semicolon or period
_CLAUSE = re.compile(r",[^,;.`]*`[A-Za-z_]\w*(?:=[^`\s][^`]*)?`[^,;.`]*(?=[,;.])")


def flag_for(command: str, name: str, value: str | None = None) -> str | None:
    """What ``command`` calls the Python argument ``name`` (given ``value``); None: nothing.

    Example:
        >>> flag_for("train", "delay", "5"), flag_for("record", "background", "False")
        ('--delay 5', '--no-background')
    """
    table = FLAGS.get(command, {})
    plain = None if value is None else value.strip("'\"")
    if plain is not None and f"{name}={plain}" in table:
        return table[f"{name}={plain}"]  # that value's flag, or None: there is none
    flag = table.get(name)
    if flag is None or plain is None:
        return flag
    on, _, off = flag.partition("/")
    if plain == "True":
        return on
    if plain == "False" and off:
        return off
    return f"{on} {plain}"


def render(text: str, command: str | None, arguments: Collection[str] | None = None) -> str:
    """``text`` with each backticked Python argument in ``arguments`` (None: any) turned into
    ``command``'s flag (see the module docstring).

    Example:
        >>> render('Expected `delay` to be ... Use `device="cpu"`.', "train", ["delay", "device"])
        'Expected `--delay` to be ... Use `--device cpu`.'
    """
    if command is None:
        return text

    def clause(match: re.Match[str]) -> str:
        span = _SPAN.search(match[0])
        named = span is not None and (arguments is None or span[1] in arguments)
        return "" if named and flag_for(command, span[1], span[2]) == NOT_HERE else match[0]

    text = _CLAUSE.sub(clause, text)

    def flag(match: re.Match[str]) -> str:
        name, value = match[1], match[2]
        if arguments is not None and name not in arguments:
            return match[0]
        found = flag_for(command, name, value)
        return match[0] if found is None else f"`{found}`"

    return _SPAN.sub(flag, text)


def _command() -> str | None:
    ctx = click.get_current_context(silent=True)
    return ctx.command.name if ctx is not None else None


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the package's errors (and a Ctrl-C) into one line and a non-zero exit; the line
    names the running command's flags where the library named its Python arguments."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BstabError as exc:
            message = render(str(exc), _command(), exc.arguments)
            raise click.ClickException(message) from None
        except KeyboardInterrupt:
            click.echo(
                "\nInterrupted. Every snapshot committed so far is kept in the run file.", err=True
            )
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(
                f"Unexpected {type(exc).__name__}: {exc}. This is a bug in basis_stability; "
                "rerun with `bstab -vv ...` for the traceback and report it."
            ) from None

    return wrapper

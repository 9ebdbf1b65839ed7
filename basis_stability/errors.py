"""The package's small error hierarchy, its one message template and its one integer check.

Every message follows one template: what was expected, what was got, and one sentence on the fix,
e.g. ``Expected `dtype` to be one of float32, float16, bfloat16 but got 'int8'. Pick one of those.``

Messages speak Python: they name the argument or config field the caller passed, in backticks
(`` `delay` ``), and give fixes as Python (`` `device="cpu"` ``, `` `force=True` ``), never as a
command-line flag. Each error also carries those names in :attr:`BstabError.arguments`:
:func:`expected` records its ``arg`` (its result is a :class:`Message`, a ``str`` that remembers
the names), and ``argument=`` adds any other name the message mentions. The CLI
(:mod:`basis_stability.cli._errors`) uses them to print its own flags (`` `--delay` ``,
`` `--device cpu` ``) instead; a Python caller can read them to tell which input was wrong.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Iterable
from typing import Any


class Message(str):
    """An error message that knows the Python arguments it names (:attr:`arguments`).

    A plain ``str`` everywhere else; string operations (``+``, ``.strip()``) return a ``str``
    without the names, so pass a message on as it is.
    """

    arguments: tuple[str, ...]

    def __new__(cls, text: str, arguments: Iterable[str] = ()) -> Message:
        message = super().__new__(cls, text)
        message.arguments = tuple(arguments)
        return message


class Shown(str):
    """Text that :func:`expected` shows as it is, not quoted: ``expected(..., Shown("a str"))``
    reads "but got a str" where a plain string would read "but got 'a str'"."""

    def __repr__(self) -> str:
        return str(self)


def names_in(message: object) -> tuple[str, ...]:
    """The Python arguments ``message`` names: a :class:`Message`'s, none for a plain ``str``.

    For code that builds one message out of another, e.g. a ``fix`` it was given::

        raise RunExistsError(f"{path} exists. {fix}", argument=names_in(fix))
    """
    return getattr(message, "arguments", ())


def _names(argument: str | Iterable[str]) -> tuple[str, ...]:
    return (argument,) if isinstance(argument, str) else tuple(argument)


class BstabError(Exception):
    """Base class of every error this package raises on purpose.

    Args:
        *args: the message (and whatever the built-in base class takes).
        argument: the Python argument (or arguments) the message names, besides those a
            :class:`Message` already carries, e.g. ``ConfigError(msg, argument="delay")``.

    Attributes:
        arguments: every argument the message names, in order, each once.
    """

    def __init__(self, *args: object, argument: str | Iterable[str] = ()) -> None:
        super().__init__(*args)
        carried = names_in(args[0]) if args else ()
        self.arguments: tuple[str, ...] = tuple(dict.fromkeys((*carried, *_names(argument))))


class ConfigError(BstabError, ValueError):
    """An argument or option has a value the package cannot use."""


class NoEligibleLayersError(BstabError, ValueError):
    """Layer selection matched nothing; the message lists the candidates."""


class RunFileError(BstabError, OSError):
    """A run file is missing, unreadable, foreign, truncated or of an unsupported version."""


class RunExistsError(RunFileError, FileExistsError):
    """Refusing to overwrite an existing run file."""


class RunMismatchError(RunFileError):
    """An existing run does not match the layers being recorded into it."""


class RunLockedError(RunFileError):
    """Another process is writing the run (it holds the run's writer lock)."""


class DamagedRunError(RunFileError):
    """A run's data fails its checksum or contradicts its own metadata."""


class WriteFailedError(RunFileError):
    """Writing a snapshot failed (a full disk, an I/O error); earlier snapshots are kept."""


class CheckpointError(BstabError, ValueError):
    """A set of checkpoints cannot be turned into a run."""


class MissingExtraError(BstabError, ImportError):
    """An optional feature was asked for but the package it needs is not installed."""


def require(module: str, extra: str, what: str, *, package: str | None = None) -> Any:
    """Import ``module`` or fail naming the extra that installs it (``package``: the missing
    distribution's name, when it is not ``module``'s first part)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{what} needs the `{package or module.split('.')[0]}` package, which is not "
            f"installed. Install it with: pip install 'basis_stability[{extra}]'"
        ) from None


def expected(
    arg: str, wanted: str, got: object, fix: str, *, argument: str | Iterable[str] | None = None
) -> Message:
    """Format the package's one error-message template; the result remembers ``arg``.

    ``argument`` replaces what it remembers when ``arg`` is not an argument the caller passed,
    e.g. a field of a file: ``expected("beta", "in (0, 1)", 1.5, fix, argument="plan")`` for
    the ``beta`` inside the plan file passed as ``plan`` (so the CLI does not call it ``--beta``).

    Example:
        >>> msg = expected("every", "a positive integer", 0, "Use 1 to snapshot every step.")
        >>> msg
        'Expected `every` to be a positive integer but got 0. Use 1 to snapshot every step.'
        >>> ConfigError(msg).arguments
        ('every',)
    """
    names = (arg,) if argument is None else _names(argument)
    return Message(f"Expected `{arg}` to be {wanted} but got {got!r}. {fix}".rstrip(), names)


def _int_at_least(name: str, value: object, low: int, wanted: str, fix: str) -> int:
    # numbers.Integral: Python and numpy integers; bool is one too, but True is no count
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(expected(name, wanted, value, fix))
    return int(value)


def positive_int(name: str, value: object, fix: str, *, wanted: str = "a positive integer") -> int:
    """``value`` as an ``int`` when it is an integer >= 1 (Python or numpy; not a bool).

    Args:
        name: the argument or config field, as the caller spelt it.
        value: what the caller passed.
        fix: the sentence on the fix, e.g. ``"Use e.g. 30."``.
        wanted: what the message says was expected, when more can be said than the default.

    Raises:
        ConfigError: ``Expected `name` to be a positive integer but got ...``.

    Example:
        >>> positive_int("epochs", 30, "Use e.g. 30.")
        30
    """
    return _int_at_least(name, value, 1, wanted, fix)


def non_negative_int(
    name: str, value: object, fix: str, *, wanted: str = "a non-negative integer"
) -> int:
    """``value`` as an ``int`` when it is an integer >= 0; otherwise as :func:`positive_int`."""
    return _int_at_least(name, value, 0, wanted, fix)


def check_options(options: Iterable[str], config: type) -> None:
    """Refuse keyword options that are not fields of the dataclass ``config``.

    For functions that pass ``**options`` on to a config (``bs.record(model, path, dtype=...)``),
    so a misspelt option fails with the valid names (and the nearest one) instead of Python's
    bare ``TypeError`` from deep inside.

    Raises:
        ConfigError: naming the first unknown option.

    Example:
        >>> from basis_stability.recording import RecordConfig
        >>> check_options(["dtype"], RecordConfig)
    """
    import dataclasses
    import difflib

    known = [f.name for f in dataclasses.fields(config)]
    for name in options:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"Did you mean `{near[0]}`? " if near else ""
            raise ConfigError(
                f"Unknown option `{name}`: it is not a {config.__name__} field. {hint}"
                f"The fields are {', '.join(known)}.",
                argument=(name, *near),
            )


def check_config(name: str, value: object, config: type) -> None:
    """Refuse a ``value`` for the argument ``name`` that is neither None nor a ``config``.

    A dict of the right fields is the common slip; the fix then shows how to build the config.

    Raises:
        ConfigError: naming ``name``, the type got and the fix.

    Example:
        >>> from basis_stability.training import TrainConfig
        >>> check_config("config", TrainConfig(epochs=3), TrainConfig)
    """
    if value is None or isinstance(value, config):
        return
    kind = config.__name__
    fix = (
        f"Build one from it: {kind}(**{name})."
        if isinstance(value, dict)
        else f"Pass e.g. {kind}() with the fields you want, or None for the defaults."
    )
    got = Shown(a_or_an(type(value).__name__))
    raise ConfigError(expected(name, f"{a_or_an(kind)} (or None)", got, fix))


def a_or_an(word: str) -> str:
    """``word`` with its indefinite article: ``a dict``, ``an int``, ``an OIALRConfig``."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def significant(value: float, digits: int = 3) -> str:
    """``value`` rounded to ``digits`` significant digits, in plain notation, trailing zeros cut.

    Epochs of step-based snapshots are fractions (``3.6363636``); messages, tables and plot labels
    print them through this one function: ``3.64``, ``0.0435``, ``40``, ``1234`` (the integer part
    is never rounded away, and never written as ``1.23e+03``).
    """
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text

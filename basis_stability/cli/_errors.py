"""Turn the package's errors into clean one-line CLI failures."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import BstabError


def _clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the package's errors (and a Ctrl-C) into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BstabError as exc:
            raise click.ClickException(str(exc)) from None
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

"""The ``bstab`` command line. Heavy imports live inside the commands so ``--help`` is instant.

One module per stage of the data flow (record -> store -> analyze -> train); each defines its
commands with ``@click.command()`` and they are attached to the ``main`` group here.
"""

from __future__ import annotations

import logging

import click

from . import analyze as _analyze
from . import compare as _compare
from . import record as _record
from . import report as _report
from . import store as _store
from . import train as _train

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="basis_stability")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Record, analyse and exploit how a network's weight bases settle during training."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _command in (
    _record.record,
    _store.inspect,
    _store.validate,
    _store.export,
    _analyze.analyze,
    _compare.compare,
    _report.report,
    _train.train,
):
    main.add_command(_command)
del _command

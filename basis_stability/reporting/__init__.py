"""Reporting: one self-contained HTML file per run (``bstab report``), and a headless
browser's screenshot of it.

Beside the stages, like :mod:`basis_stability.plots`: it shows what ``analysis`` measured and
``recommend`` decided, with the run's metadata from ``store``, and decides nothing itself.

Example:
    >>> from basis_stability.reporting import html_report, screenshot
    >>> page = html_report("runs/cnn-digits-seed0.h5")  # doctest: +SKIP
    >>> screenshot(page, "report.png")  # doctest: +SKIP
"""

from .browser import BrowserNotFoundError, find_browser, screenshot
from .page import default_output, html_report, render_html
from .runinfo import RunInfo, read_run_info

__all__ = [
    "BrowserNotFoundError",
    "RunInfo",
    "default_output",
    "find_browser",
    "html_report",
    "read_run_info",
    "render_html",
    "screenshot",
]

"""A real browser's screenshot of a report: headless Chromium (or Chrome) draws the page.

Used by the tests (the page renders, not only parses) and by ``docs/make_figures.sh`` (the
README's screenshot). The page needs no network, so neither does the browser.

Example:
    >>> screenshot("runs/cnn-digits-seed0-report.html", "report.png")  # doctest: +SKIP
    PosixPath('report.png')
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import BstabError, ConfigError, RunFileError, expected

#: the names a Chromium-family browser goes by on Linux, macOS and in containers
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
MAC_CHROME = "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"
ENV = "BSTAB_BROWSER"  # an explicit browser binary wins over the search
#: Chromium's switches for one headless screenshot (name -> value; None: a plain switch)
SWITCHES: dict[str, str | None] = {
    "headless": None,
    "disable-gpu": None,
    "no-sandbox": None,  # containers and root: Chromium's sandbox needs user namespaces
    "hide-scrollbars": None,
    "no-first-run": None,
    "disable-extensions": None,
    "force-device-scale-factor": "1",  # one CSS pixel is one PNG pixel
}


class BrowserNotFoundError(BstabError, RuntimeError):
    """No Chromium-family browser to draw the page with."""


def find_browser() -> str | None:
    """The first headless-capable browser found: ``$BSTAB_BROWSER``, then :data:`BROWSERS` on
    ``PATH``, then Chrome's macOS location; None when there is none."""
    explicit = os.environ.get(ENV)
    if explicit:
        return shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return MAC_CHROME if os.access(MAC_CHROME, os.X_OK) else None


def screenshot(
    html_path: str | os.PathLike,
    png_path: str | os.PathLike,
    size: tuple[int, int] = (1200, 2000),
    timeout: float = 120.0,
    browser: str | None = None,
) -> Path:
    """Draw ``html_path`` in a headless browser and save the window as a PNG.

    Args:
        html_path: the page (a local file).
        png_path: where the screenshot goes (its folder is created).
        size: the window, ``(width, height)`` in CSS pixels: the PNG's size.
        timeout: seconds the browser may take before it is stopped.
        browser: the browser binary; default :func:`find_browser`.

    Raises:
        BrowserNotFoundError: no browser was found (install ``chromium``, or set
            ``$BSTAB_BROWSER``).
        RunFileError: the page is missing, or the browser failed or wrote no PNG in time.
    """
    page, png = Path(html_path).resolve(), Path(png_path)
    if not page.is_file():
        raise RunFileError(f"Cannot take a screenshot of {page}: no such file. Write it first.")
    if not (len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ConfigError(expected("size", "(width, height) in pixels", size, "Use (1200, 2000)."))
    exe = browser or find_browser()
    if exe is None:
        raise BrowserNotFoundError(
            "No Chromium or Chrome browser was found (looked for $BSTAB_BROWSER and "
            f"{', '.join(BROWSERS)} on PATH). Install one, e.g. `apt-get install chromium`, "
            f"or set {ENV} to its path."
        )
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bstab-browser-") as profile:
        _run(exe, page, png.resolve(), size, timeout, profile)
    if not png.is_file() or not png.stat().st_size:
        raise RunFileError(f"{exe} wrote no screenshot of {page} to {png}.")
    return png


def _switch(name: str, value: str | None) -> str:
    """A Chromium command-line switch: ``--name`` or ``--name=value``."""
    return "--" + name + ("" if value is None else "=" + value)


def _run(exe: str, page: Path, png: Path, size: tuple[int, int], timeout: float, profile: str):
    png.unlink(missing_ok=True)  # so a stale file cannot pass for this run's screenshot
    switches = {
        **SWITCHES,
        "user-data-dir": profile,
        "window-size": f"{size[0]},{size[1]}",
        "screenshot": str(png),
    }
    cmd = [exe, *(_switch(k, v) for k, v in switches.items()), page.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RunFileError(
            f"{exe} took more than {timeout:g} s to draw {page}; stopped. Pass a larger `timeout`."
        ) from None
    except OSError as exc:
        raise BrowserNotFoundError(
            f"Cannot run the browser {exe}: {exc.strerror or exc}."
        ) from None
    if done.returncode != 0 and not png.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RunFileError(
            f"{exe} failed to draw {page} (exit {done.returncode}): {' / '.join(tail)}"
        )

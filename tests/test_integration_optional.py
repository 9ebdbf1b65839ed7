"""Lightning and transformers are optional: the package, its CLI and ``bstab --help`` work without
them, ``import basis_stability`` never imports them, and an integration asked for without its
framework fails with ``MissingExtraError`` naming the extra to install.

Each check runs in a fresh interpreter: a framework is hidden by a meta-path finder installed
before anything else is imported, so it looks uninstalled even where it is installed.
"""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate")

BLOCKER = """
import importlib.abc, sys

class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, _Hide(HIDDEN))
"""


def _python(code: str, hidden: tuple[str, ...] = (), *args: str) -> subprocess.CompletedProcess:
    prelude = BLOCKER.replace("HIDDEN", repr(hidden)) if hidden else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def _facts(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE = """
import json, sys
facts = {}
import basis_stability, basis_stability.cli, basis_stability.integrations
facts["version"] = basis_stability.__version__
facts["loaded"] = sorted(
    m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning",
    "lightning_fabric", "transformers", "accelerate")
)
from basis_stability.integrations._common import MissingExtraError
for name in ("lightning", "hf"):
    try:
        __import__(f"basis_stability.integrations.{name}")
    except ImportError as exc:
        facts[name] = {
            "type": type(exc).__name__,
            "missing_extra": isinstance(exc, MissingExtraError),
            "import_error": isinstance(exc, ImportError),
            "message": str(exc),
            "half_imported": f"basis_stability.integrations.{name}" in sys.modules,
        }
    else:
        facts[name] = None
print(json.dumps(facts))
"""


def test_import_basis_stability_does_not_import_the_frameworks():
    code = """
    import json, sys
    import basis_stability, basis_stability.cli, basis_stability.integrations
    names = FRAMEWORKS
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in names)
    print(json.dumps({"loaded": loaded, "bs": "basis_stability" in sys.modules}))
    """
    facts = _facts(_python(code.replace("FRAMEWORKS", repr(FRAMEWORKS))))
    assert facts["bs"]
    assert facts["loaded"] == []


def _extras() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return dict(cfg["options.extras_require"])


@pytest.mark.parametrize(
    ("hidden", "expect"),
    [
        (("lightning", "pytorch_lightning", "lightning_fabric"), {"lightning"}),
        (("transformers",), {"hf"}),
        (("accelerate",), {"hf"}),  # transformers alone is not enough for the Trainer
        (FRAMEWORKS, {"lightning", "hf"}),
    ],
    ids=["no-lightning", "no-transformers", "no-accelerate", "neither"],
)
def test_missing_framework_gives_missing_extra_error_naming_the_extra(hidden, expect):
    facts = _facts(_python(PROBE, hidden))
    assert facts["version"]
    assert not set(facts["loaded"]) & set(hidden)
    extras = _extras()
    for name in expect:
        err = facts[name]
        assert err is not None, f"importing integrations.{name} did not fail"
        assert err["type"] == "MissingExtraError"
        assert err["missing_extra"] and err["import_error"]
        assert f"pip install 'basis_stability[{name}]'" in err["message"]
        assert name in extras  # the extra the message names exists in setup.cfg
        assert not err["half_imported"]
    if expect == {"lightning"}:
        # hiding lightning leaves the HF integration importable. (The converse is not
        # checked: lightning's torchmetrics imports transformers whenever its metadata says it
        # is installed, which a hidden-but-installed package cannot mimic.)
        assert facts["hf"] is None, facts["hf"]


def test_bstab_help_works_without_the_frameworks():
    code = """
    import runpy, sys
    sys.argv = ["bstab", "--help"]
    try:
        runpy.run_module("basis_stability", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    assert not [m for m in sys.modules if m.split(".")[0] in ("lightning", "transformers")]
    """
    proc = _python(code, FRAMEWORKS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Usage" in proc.stdout or "usage" in proc.stdout
    for command in ("record", "analyze", "train", "inspect"):  # the commands are listed
        assert command in proc.stdout


def test_python_m_basis_stability_help():
    proc = subprocess.run(
        [sys.executable, "-m", "basis_stability", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Usage" in proc.stdout or "usage" in proc.stdout

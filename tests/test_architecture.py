"""The rules of the package's layout, as tests (STYLE.md, "The architecture is the data flow").

Read from the source by AST, so they hold for code that no test runs: no private name crosses a
module boundary, no function is longer than a screen, ``import basis_stability`` stays light,
the public API and the old import paths resolve, a stage never imports a later stage, and every
config dataclass is frozen.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "basis_stability"
MAX_FUNCTION_LINES = 60
#: the stages in the order the data flows; a stage imports only from the ones before it
STAGES = ("recording", "store", "analysis", "recommend", "lowrank", "training", "exporting")
ANYONE_MAY_IMPORT = {"store"}
HEAVY = ("torch", "h5py", "pandas", "matplotlib", "click")


# ---------------------------------------------------------------------- reading the source
@dataclasses.dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. basis_stability.analysis.report
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    def resolve(self, node: ast.ImportFrom) -> str:
        """The absolute module a ``from ... import`` reads from."""
        if node.level == 0:
            return node.module or ""
        parts = self.name.split(".") if self.is_package else self.name.split(".")[:-1]
        base = parts[: len(parts) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))


def _modules() -> list[Module]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(Module(".".join(parts), path, ast.parse(path.read_text(), str(path))))
    return out


MODULES = _modules()


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of this package (a file on disk)."""
    if dotted != "basis_stability" and not dotted.startswith("basis_stability."):
        return False
    where = PACKAGE.parent.joinpath(*dotted.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _where(module: Module, node: ast.AST) -> str:
    return f"{module.path.relative_to(PACKAGE.parent)}:{node.lineno}"


def _imports(module: Module) -> list[tuple[ast.AST, str]]:
    """Every module of this package that ``module`` imports, anywhere in it (module level, inside
    functions, under TYPE_CHECKING), with the import node."""
    out = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names if _is_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            source = module.resolve(node)
            if not _is_module(source):
                continue
            out.append((node, source))
            out += [
                (node, f"{source}.{a.name}") for a in node.names if _is_module(f"{source}.{a.name}")
            ]
    return out


def private_imports(module: Module) -> list[str]:
    """``from X import _y`` and ``mod._y`` on a module name bound by an import, where X / mod
    is another module of this package. A module whose own name is private (``_dist``) may be
    imported as a module; dunder names are fine."""
    found, bound = [], {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            source = module.resolve(node)
            if not _is_module(source):
                continue
            for alias in node.names:
                if _is_module(f"{source}.{alias.name}"):  # a submodule, e.g. `from .. import _dist`
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif _private(alias.name):
                    found.append(f"{_where(module, node)} from {source} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _is_module(alias.name):
                    bound[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0]
                    )
    for node in ast.walk(module.tree):
        chain = []
        inner = node
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if not (isinstance(node, ast.Attribute) and isinstance(inner, ast.Name)):
            continue
        if inner.id not in bound or not _private(node.attr):
            continue
        owner = ".".join([bound[inner.id], *reversed(chain[1:])])
        if _is_module(owner) and owner != module.name and not _is_module(f"{owner}.{node.attr}"):
            found.append(f"{_where(module, node)} {owner}.{node.attr}")
    return found


def stage_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def upward_imports(module: Module) -> list[str]:
    """Imports of a later stage by a module of an earlier one (any stage may import store)."""
    mine = stage_of(module.name)
    if mine is None:
        return []
    found = []
    for node, target in _imports(module):
        theirs = stage_of(target)
        if theirs is None or theirs in ANYONE_MAY_IMPORT:
            continue
        if STAGES.index(theirs) > STAGES.index(mine):
            found.append(f"{_where(module, node)} {mine} -> {target}")
    return sorted(set(found))


def long_functions(module: Module, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{_where(module, node)} {node.name}: {lines} lines")
    return found


# ---------------------------------------------------------------------- the checks check
def _parse(source: str, name: str = "basis_stability.analysis.fake") -> Module:
    path = PACKAGE / "analysis" / "fake.py"
    return Module(name, path, ast.parse(textwrap.dedent(source)))


def test_the_readers_see_what_they_look_for():
    """The scanners find planted violations and pass clean code (so a pass means something)."""
    bad = _parse(
        """
        from .report import _pairs
        from ..store import reader
        from .. import _dist, recommend
        import basis_stability.analysis.report as rep

        def f():
            from ..training.oialr import OIALR
            return reader._plain, rep._pairs, _dist.rank(), reader.__name__
        """
    )
    assert [v.split(" ", 1)[1] for v in private_imports(bad)] == [
        "from basis_stability.analysis.report import _pairs",
        "basis_stability.store.reader._plain",
        "basis_stability.analysis.report._pairs",
    ]
    assert [v.split(" ", 1)[1] for v in upward_imports(bad)] == [
        "analysis -> basis_stability.recommend",
        "analysis -> basis_stability.training.oialr",
    ]
    clean = _parse("from ..store.reader import open_run\nfrom .lag import Lag\n")
    assert private_imports(clean) == [] and upward_imports(clean) == []
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(_parse(f"def long():\n{body}\n")) == [
        f"basis_stability/analysis/fake.py:1 long: {MAX_FUNCTION_LINES + 1} lines"
    ]
    assert long_functions(_parse(f"def ok():\n{body[: body.rindex(chr(10))]}\n")) == []
    assert len(MODULES) > 50 and any(m.name == "basis_stability.jobs" for m in MODULES)


# ---------------------------------------------------------------------- a. private names
def test_no_module_imports_a_private_name_of_another_module():
    found = [v for m in MODULES for v in private_imports(m)]
    assert found == [], "private names used across modules:\n" + "\n".join(found)


# ---------------------------------------------------------------------- b. function length
def test_no_function_is_longer_than_60_lines():
    found = [v for m in MODULES for v in long_functions(m)]
    assert found == [], f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


# ---------------------------------------------------------------------- c. a light import
def test_import_basis_stability_imports_no_heavy_dependency():
    code = (
        "import json, sys\nimport basis_stability\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


# ---------------------------------------------------------------------- d. the public API
OLD_PATHS = [
    ("basis_stability.analyze.engine", "basis_stability.analysis.engine"),
    ("basis_stability.train.oialr", "basis_stability.training.oialr"),
    ("basis_stability.record", "basis_stability.recording"),
    ("basis_stability.store.export", "basis_stability.exporting.snapshot"),
    ("basis_stability.lowrank.rules", "basis_stability.recommend.rules"),
]
#: old paths that were subpackages named like a verb: their alias stays callable, so it
#: forwards to the new module instead of being it (``bs.record`` must still record)
VERB_PATHS = {"basis_stability.analyze", "basis_stability.record", "basis_stability.train"}

_PUBLIC = """
import inspect, json
import basis_stability as bs
missing = [n for n in bs.__all__ if getattr(bs, n, None) is None]
names = ("analyze", "record", "train", "export")
verbs = {v: inspect.isfunction(getattr(bs, v)) for v in names}
print(json.dumps({"missing": missing, "verbs": verbs, "n": len(bs.__all__)}))
"""
_OLD_PATH = """
import importlib, json, sys, warnings
import basis_stability as bs
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import {old}
old, new = sys.modules["{old}"], importlib.import_module("{new}")
public = [n for n in dir(new) if not n.startswith("_")]
print(json.dumps({{
    "warnings": [(w.category.__name__, str(w.message)) for w in caught],
    "same": old is new,
    "forwards": all(getattr(old, n) is getattr(new, n) for n in public),
    "n_public": len(public),
    "verbs": {{v: callable(getattr(bs, v)) for v in ("analyze", "record", "train")}},
}}))
"""
_OLD_VERBS = """
import json, warnings
warnings.simplefilter("ignore", DeprecationWarning)
from basis_stability import api
from basis_stability.analyze import analyze
from basis_stability.record import record
from basis_stability.train import train
olds = {"analyze": analyze, "record": record, "train": train}
print(json.dumps({v: [callable(f), f is getattr(api, v)] for v, f in olds.items()}))
"""


@pytest.fixture(scope="module")
def fresh() -> dict[str, dict]:
    """Each script run at once in its own new interpreter (fresh sys.modules and warning
    filters); each prints one JSON object last."""
    scripts = {"public": _PUBLIC, "verbs": _OLD_VERBS}
    scripts.update({old: _OLD_PATH.format(old=old, new=new) for old, new in OLD_PATHS})
    running = {
        name: subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, code in scripts.items()
    }
    out = {}
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = stdout.strip().splitlines()
        out[name] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": stderr}
    return out


def _result(fresh: dict, name: str) -> dict:
    assert "error" not in fresh[name], fresh[name].get("error")
    return fresh[name]


def test_every_public_name_resolves_and_the_verbs_are_functions(fresh):
    got = _result(fresh, "public")
    assert got["missing"] == [] and got["n"] > 10
    assert got["verbs"] == {"analyze": True, "record": True, "train": True, "export": True}


@pytest.mark.parametrize(("old", "new"), OLD_PATHS, ids=[o for o, _ in OLD_PATHS])
def test_an_old_import_path_warns_and_gives_the_new_module(fresh, old: str, new: str):
    got = _result(fresh, old)
    deprecations = [msg for cat, msg in got["warnings"] if cat == "DeprecationWarning"]
    assert deprecations, got["warnings"]
    assert any(new in msg for msg in deprecations), deprecations  # names the new home
    if old in VERB_PATHS:
        assert got["forwards"] and got["n_public"] > 0
    else:
        assert got["same"], f"sys.modules[{old!r}] is not {new}"
    assert got["verbs"] == {"analyze": True, "record": True, "train": True}


def test_from_an_old_verb_package_import_the_verb_gives_the_verb(fresh):
    got = _result(fresh, "verbs")
    assert got == {"analyze": [True, True], "record": [True, True], "train": [True, True]}


# ---------------------------------------------------------------------- e. the stage order
def test_no_stage_imports_a_later_stage():
    found = [v for m in MODULES for v in upward_imports(m)]
    order = " < ".join(STAGES)
    assert found == [], f"imports against the data flow ({order}):\n" + "\n".join(found)


# ---------------------------------------------------------------------- f. frozen configs
CONFIGS = {
    "RecordConfig": "basis_stability.recording",
    "AnalysisConfig": "basis_stability.analysis",
    "EngineConfig": "basis_stability.analysis",
    "PlanConfig": "basis_stability.recommend",
    "TrainConfig": "basis_stability.training",
    "OIALRConfig": "basis_stability.training.oialr",
    "FactorizeConfig": "basis_stability.lowrank",
    "LiveStability": "basis_stability.analysis.live",
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_dataclass_is_frozen(name: str):
    cls = getattr(importlib.import_module(CONFIGS[name]), name)
    assert dataclasses.is_dataclass(cls) and dataclasses.fields(cls), f"{name} is no dataclass"
    assert cls.__dataclass_params__.frozen, f"{name} is not frozen: @dataclass(frozen=True)"

"""The import paths of 0.1, kept working with a DeprecationWarning.

The stages were renamed so that the package's verbs are free (``bs.analyze(path)`` is a
function; ``basis_stability.analyze`` was the subpackage). A meta-path finder maps each old
module path to the module that now holds it (the same module object, so classes and state are
shared). ``basis_stability.analyze`` itself becomes a callable alias module: importing it binds
the name on the package, and calling it still runs the verb.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

# old path -> new path, longest first wins
MOVED = {
    "basis_stability.analyze": "basis_stability.analysis",
    "basis_stability.record": "basis_stability.recording",
    "basis_stability.train.export": "basis_stability.exporting.factorized",
    "basis_stability.train": "basis_stability.training",
    "basis_stability.store.export": "basis_stability.exporting.snapshot",
    "basis_stability.lowrank.rules": "basis_stability.recommend.rules",
}
# (old module, name) -> the module that holds the name now
MOVED_NAMES = {("basis_stability.store", "export_snapshot"): "basis_stability.exporting.snapshot"}
# the old top-level names that are verbs now: their alias module calls the verb
VERBS = {
    "basis_stability.analyze": "analyze",
    "basis_stability.record": "record",
    "basis_stability.train": "train",
}


def new_name(fullname: str) -> str | None:
    """The module that now holds ``fullname``, or None when it did not move."""
    for old in sorted(MOVED, key=len, reverse=True):
        if fullname == old or fullname.startswith(old + "."):
            return MOVED[old] + fullname[len(old) :]
    return None


def moved_attribute(module: str, name: str) -> Any:
    """A name 0.1 had on ``module`` that now lives elsewhere, with a DeprecationWarning; the
    AttributeError a module's ``__getattr__`` owes for any other name."""
    where = MOVED_NAMES.get((module, name))
    if where is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} moved to {where} (also basis_stability.{name}); the old name will go "
        "in 0.3.",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(where), name)


class _VerbModule(types.ModuleType):
    """The old subpackage: its attributes are the new one's, and calling it runs the verb."""

    def __init__(self, name: str, target: types.ModuleType, verb: str) -> None:
        super().__init__(name, target.__doc__)
        self.__dict__["_target"] = target
        self.__dict__["_verb"] = verb
        self.__path__ = list(getattr(target, "__path__", []))

    def __getattr__(self, name: str) -> Any:
        if name == self.__dict__["_verb"]:  # ``from basis_stability.analyze import analyze``
            from . import api

            return getattr(api, name)
        return getattr(self.__dict__["_target"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from . import api

        return getattr(api, self.__dict__["_verb"])(*args, **kwargs)


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: Any) -> types.ModuleType:
        warnings.warn(
            f"{self.old} moved to {self.new}; the old path will go in 0.3.",
            DeprecationWarning,
            stacklevel=4,
        )
        target = importlib.import_module(self.new)
        if self.old in VERBS:
            return _VerbModule(self.old, target, VERBS[self.old])
        return target

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module is the new one (or an alias of it)."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = new_name(fullname)
        if new is None:
            return None
        is_package = importlib.util.find_spec(new) is not None and bool(
            importlib.util.find_spec(new).submodule_search_locations
        )
        return importlib.util.spec_from_loader(
            fullname, _Alias(fullname, new), is_package=is_package
        )


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())

"""The one refusal of an output path that already exists (store/paths.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from basis_stability.errors import Message, RunExistsError
from basis_stability.store.paths import refuse_existing, write_atomically


def test_a_new_path_passes_and_nothing_is_created(tmp_path: Path):
    assert refuse_existing(tmp_path / "a" / "run.h5", "path", "Choose another path") is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_existing_path_is_refused_naming_argument_path_and_fix(tmp_path: Path, kind: str):
    path = tmp_path / "run.h5"
    path.mkdir() if kind == "folder" else path.write_bytes(b"mine")
    with pytest.raises(RunExistsError) as caught:
        refuse_existing(path, "path", "Pass `force=True` to replace it")
    assert str(caught.value) == (
        f"Expected `path` to be a new file but {path} already exists. Pass `force=True` to "
        "replace it; nothing was written."
    )
    assert caught.value.arguments == ("path",)
    assert isinstance(caught.value, FileExistsError)  # callers may catch the built-in
    assert path.is_dir() if kind == "folder" else path.read_bytes() == b"mine"


def test_the_arguments_a_fix_names_are_carried_on(tmp_path: Path):
    (tmp_path / "out.safetensors").write_text("")
    fix = Message("Pass `force=True`, or another `out`", ["force", "out"])
    with pytest.raises(RunExistsError) as caught:
        refuse_existing(tmp_path / "out.safetensors", "out", fix)
    assert caught.value.arguments == ("out", "force")


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_an_atomically_written_file_has_the_mode_open_would_give(tmp_path: Path, mask: int):
    old = os.umask(mask)
    try:
        out = write_atomically(
            tmp_path / "a.bin", lambda t: t.write_bytes(b"x"), force=False, argument="path"
        )
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    assert out.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_an_atomic_write_that_fails_leaves_no_file(tmp_path: Path):
    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(tmp_path / "a.bin", fail, force=False, argument="path")
    assert list(tmp_path.iterdir()) == []

"""Execute the example notebooks top to bottom in a fresh kernel of this interpreter, twice.

Each notebook must run without a cell error, and every cell that draws (calls ``plt.*``,
``.plot(``, ``imshow(``, a ``plots.*`` function, ...) must have produced a PNG image. Each one
keeps its files in ``outputs/<notebook>/`` beside it, so it runs twice in a row in the same
folder (a temporary one here): the second run must replace the first one's files, not trip
over them. No output may carry tqdm's "IProgress not found" warning (``ipywidgets`` is in the
``test`` extra, so ``tqdm.auto`` draws widgets). The kernel is
started from a kernelspec written into a temporary folder that points at ``sys.executable``, so
the notebooks run in the test's own environment (the venv) even on a machine where no Jupyter
kernel is installed, or where the default ``python3`` kernel belongs to another interpreter.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "bstab-test-python3"  # a name no user kernelspec is likely to shadow

# A cell draws when it calls one of these (comments and import lines are ignored, so that
# ``import matplotlib.pyplot as plt`` or ``%matplotlib inline`` do not count).
DRAWS = re.compile(
    r"\bplt\.(?!rcParams|style|close|ioff|ion)\w+"
    r"|\.plot\(|\bimshow\(|\bheatmap\(|\bspectr\w*\(|\bplots(?:_compare)?\.\w+\("
)
PROBE = "import sys as _bstab_sys; print('BSTAB-PREFIX=' + _bstab_sys.prefix)"


def draws(source: str) -> bool:
    lines = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(("#", "import ", "from ", "%")):
            continue
        lines.append(line.split("#", 1)[0])
    return bool(DRAWS.search("\n".join(lines)))


def has_png(cell) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


@pytest.fixture
def kernel_path(tmp_path_factory, monkeypatch) -> str:
    """A kernelspec for this interpreter, found first through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "bstab tests", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    return KERNEL


def test_notebooks_exist():
    names = [nb.name for nb in NOTEBOOKS]
    assert names == [
        "01_record_and_inspect.ipynb",
        "02_stability_and_spectra.ipynb",
        "03_oialr_closing_the_loop.ipynb",
        "04_compare_runs.ipynb",
    ]


def _execute(path: Path, folder: Path, kernel: str):
    """Run the notebook at ``path`` with ``folder`` as its working folder; the executed
    notebook (probe cell first) and its wall time."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name} is stored with outputs; clear them"
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name=kernel, resources={"metadata": {"path": str(folder)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed:\n{exc}")
    return nb, time.perf_counter() - start


def _texts(nb) -> str:
    """Every stream and plain-text output of the executed notebook, joined."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
            parts.extend(out.get("traceback", []))
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, kernel_path: str):
    for attempt in ("first", "second"):  # the second run replaces the first one's files
        nb, seconds = _execute(path, tmp_path, kernel_path)
        print(f"{path.name} ({attempt} run): {seconds:.1f} s")
        probe = "".join(out.get("text", "") for out in nb.cells[0].outputs)
        assert f"BSTAB-PREFIX={sys.prefix}" in probe, (
            f"the kernel did not run this interpreter ({sys.prefix}): {probe!r}"
        )
        missing = [
            i
            for i, cell in enumerate(nb.cells[1:], start=1)
            if cell.cell_type == "code" and draws(cell.source) and not has_png(cell)
        ]
        assert not missing, (
            f"{path.name}: cells {missing} draw but produced no image:\n"
            + "\n---\n".join(nb.cells[i].source[:300] for i in missing)
        )
        text = _texts(nb)
        assert "TqdmWarning" not in text and "IProgress not found" not in text, text[-2000:]
        assert seconds < 240, f"{path.name} took {seconds:.0f} s (budget: 2 minutes on 2 cores)"
    assert (tmp_path / "outputs" / path.stem).is_dir(), "it keeps no output folder beside it"

"""The curated public API: every advertised name resolves, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import basis_stability as bs


def test_every_public_name_resolves():
    for name in bs.__all__:
        assert getattr(bs, name) is not None, name
    assert callable(bs.analyze) and callable(bs.export) and callable(bs.plots.stability_heatmap)


def test_import_is_light():
    code = (
        "import sys, basis_stability\n"
        "heavy = [m for m in ('matplotlib', 'h5py', 'click', 'pandas', 'torch') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

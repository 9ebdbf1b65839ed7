"""Every ``python`` block of docs/integrations.md runs, in order, in a fresh folder.

The blocks train tiny Lightning and Hugging Face models (real ``fit()``/``train()``), so the page
cannot drift from the integrations' API. Each block's claims are checked on the objects it leaves
behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("transformers")

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def test_every_python_block_runs_and_says_what_the_page_says(tmp_path, monkeypatch):
    import basis_stability as bs
    from basis_stability.lowrank.layers import LowRankLinear

    monkeypatch.chdir(tmp_path)
    text = DOC.read_text()
    python = [
        (line, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == "python"
        for line in [text[: m.start()].count("\n") + 1]
    ]
    assert len(python) == 4
    ns: dict = {}
    for line, code in python:
        exec(compile(code, f"docs/integrations.md block at line {line}", "exec"), ns)  # noqa: S102

    with bs.open_run("lightning.h5") as run:  # initial + one snapshot per epoch, with val_acc
        frame = run.snapshots()
        assert frame["epoch"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert frame["step"].tolist() == [0, 8, 16, 24]
        assert frame["val_acc"].iloc[1:].notna().all()
    with bs.open_run("lightning-oialr.h5") as run:  # the events the page promises
        assert [(e["event"], e["step"]) for e in run.events()] == [
            ("convert", 16),
            ("update", 16),
            ("update", 24),
            ("update", 32),
        ]
    assert isinstance(ns["model"].net[0], LowRankLinear)
    assert ns["model"].net[0].rank < 16
    with bs.open_run("hf.h5") as run:
        frame = run.snapshots()
        assert frame["epoch"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert frame["eval_loss"].iloc[1:].notna().all()
        assert "epoch (metric)" not in frame.columns
    assert ns["trainer"].oialr.converted_at == 12
    assert Path(ns["path"]).name == "lightning-snapshot3.safetensors"
    with bs.open_run("lightning.h5") as run:
        for info in run.layers:
            exported = ns["weights"][info.param_name].numpy()
            assert (exported == run.layer(info.name).original(-1)).all()

"""Every code block of README.md runs, in order, in a fresh folder — so the README cannot rot.

The two blocks CI runs itself (the setup and test commands after the ``ci:`` markers) are left to
``.ci/run``. Python blocks share one namespace, seeded with the names the README's loop sketch
assumes (``model``, ``loader``, ``optimizer``, ``epochs``, ``train_one_epoch``). Each line of a
bash block is one ``bstab`` command, run through click's test runner.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from basis_stability.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"(<!-- ci:\w+ -->\n)?```(\w+)\n(.*?)```", re.S)


def readme_blocks() -> list[tuple[int, str, str]]:
    """(line number, language, code) of every fenced block that is not a CI command."""
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1):
            continue
        line = text[: match.start()].count("\n") + 1
        blocks.append((line, match.group(2), match.group(3)))
    return blocks


def _prelude() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    loader = [(torch.randn(32, 8), torch.randint(0, 4, (32,))) for _ in range(5)]

    def train_one_epoch(model, loader, optimizer):
        correct = total = 0
        for x, y in loader:
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
        return loss.item(), correct / total

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return {
        "model": model,
        "loader": loader,
        "optimizer": optimizer,
        "epochs": 3,
        "train_one_epoch": train_one_epoch,
    }


def _checkpoints(folder: Path) -> None:
    folder.mkdir()
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    for epoch in (1, 2, 3):
        torch.save(model.state_dict(), folder / f"epoch_{epoch}.pt")


def _run_bash(code: str, where: str) -> None:
    for raw in code.splitlines():
        args = shlex.split(raw, comments=True)
        if not args:
            continue
        assert args[0] == "bstab", f"{where}: README bash lines must be bstab commands: {raw}"
        result = CliRunner().invoke(main, [*args[1:], *_quiet(args[1])])
        assert result.exit_code == 0, f"{where}: `{raw.strip()}` failed:\n{result.output}"


def _quiet(command: str) -> list[str]:
    return ["--no-progress"] if command in ("record", "analyze", "report", "train") else []


def test_readme_has_the_two_commands_first():
    text = README.read_text()
    setup = text.index("<!-- ci:setup -->")
    assert setup < text.index("<!-- ci:test -->") < text.index("## ")
    assert "torch==2.13.0" in text[setup : text.index("<!-- ci:test -->")]


@pytest.mark.filterwarnings("ignore:The recorder for .* never fired:RuntimeWarning")
def test_every_readme_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _checkpoints(tmp_path / "ckpts")
    # the state the README's setup command leaves behind: the default run
    result = CliRunner().invoke(main, ["record", "--no-progress"])
    assert result.exit_code == 0, result.output
    namespace = _prelude()
    blocks = readme_blocks()
    assert {lang for _, lang, _ in blocks} <= {"python", "bash"}
    for line, lang, code in blocks:
        where = f"README.md block at line {line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - running the docs
        else:
            _run_bash(code, where)
    assert Path("runs/mine.h5").exists() and Path("runs/ckpts.h5").exists()

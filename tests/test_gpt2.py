"""GPT-2 end to end on a tiny ``GPT2LMHeadModel`` built from a config (no hub access).

transformers' ``Conv1D`` stores its weight ``(in, out)``. Every test compares against the oracle
"the tall matrix a ``Linear`` of the same layer would give": ``L = weight.T`` (``(out, in)``),
kept as is when ``out >= in`` and transposed otherwise, written here in plain numpy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import basis_stability as bs  # noqa: E402
from basis_stability import analyze  # noqa: E402
from basis_stability.errors import ConfigError  # noqa: E402
from basis_stability.exporting.factorized import compare_export, count_macs, export_factorized  # noqa: E402
from basis_stability.lowrank import densify_, factor_of, factorize_, low_rank_layers  # noqa: E402
from basis_stability.lowrank.layers import LowRankConv1D  # noqa: E402
from basis_stability.recording.recorder import Recorder  # noqa: E402
from basis_stability.training.oialr import OIALR, OIALRConfig  # noqa: E402
from basis_stability.views import measure_coverage, select_layers  # noqa: E402

BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
CONV1D_NAMES = [f"transformer.h.{i}.{n}" for i in range(2) for n in BLOCK_LAYERS]
VOCAB, WIDTH = 100, 32


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=WIDTH, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32
    )
    return transformers.GPT2LMHeadModel(config).eval()


def linear_tall(weight_in_out: np.ndarray) -> np.ndarray:
    """The oracle: the tall matrix of the Linear equivalent (out, in) = weight.T."""
    lin = weight_in_out.T
    return lin if lin.shape[0] >= lin.shape[1] else lin.T


def tokens(n: int = 4, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def train_steps(model, opt, steps: int, seed: int = 0, oialr=None) -> list[float]:
    model.train()
    losses = []
    for i in range(steps):
        x = tokens(seed=seed + i)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if oialr is not None:
            oialr.step()
    return losses


def test_every_conv1d_is_selected_with_the_tall_matrix_of_its_linear():
    model = tiny_gpt2()
    sel = select_layers(model)
    assert [v.name for v in sel.views] == CONV1D_NAMES
    modules = dict(model.named_modules())
    for view in sel.views:
        weight = modules[view.name].weight.detach()
        assert isinstance(modules[view.name], Conv1D)
        assert view.orientation == "in_out" and view.kind == "linear"
        got = view.matrix(weight).numpy()
        np.testing.assert_array_equal(got, linear_tall(weight.numpy()))
        assert got.shape == view.shape
    square = next(v for v in sel.views if v.name.endswith("attn.c_proj"))
    assert square.shape == (WIDTH, WIDTH) and square.transposed  # U lives in the output space
    reasons = dict(sel.skipped)
    assert "tied" in reasons["lm_head"] and "transformer.wte" in reasons["lm_head"]
    assert reasons["transformer.wte"].startswith("embedding layers are recorded only")


def test_coverage_of_gpt2_is_the_block_matrices():
    model = tiny_gpt2()
    cov = measure_coverage(model, select_layers(model).views)
    # 2 blocks x (c_attn 32x96 + c_proj 32x32 + c_fc 32x128 + c_proj 128x32); wte 100x32 and
    # wpe 32x32 are not recorded (the tied lm_head is wte and counts once)
    assert (cov.recorded_params, cov.eligible_2d_params) == (24_576, 28_800)


def test_the_tied_head_is_recorded_once_when_embeddings_are_selected():
    model = tiny_gpt2()
    sel = select_layers(model, types=["linear", "embedding"])
    names = [v.name for v in sel.views]
    assert "transformer.wte" in names and "lm_head" not in names
    assert dict(sel.skipped)["lm_head"].startswith("tied to transformer.wte")


def test_naming_both_holders_of_the_tied_weight_is_refused():
    with pytest.raises(ConfigError, match=r"lm_head and transformer.wte are the same tensor"):
        select_layers(tiny_gpt2(), include=["transformer.wte", "lm_head"])


def test_recorded_gpt2_run_holds_each_conv1d_exactly_and_analyses(tmp_path):
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    path = tmp_path / "gpt2.h5"
    captured = []
    with Recorder(model, path) as rec:
        for epoch in range(1, 5):
            train_steps(model, opt, 3, seed=10 * epoch)
            rec.snapshot(epoch=epoch, step=3 * epoch)
            captured.append(
                {n: model.get_submodule(n).weight.detach().clone() for n in CONV1D_NAMES}
            )
    with bs.open_run(path) as run:
        assert run.layer_names == CONV1D_NAMES
        for name in CONV1D_NAMES:
            info = next(i for i in run.layers if i.name == name)
            assert info.orientation == "in_out"
            for t in range(1, 5):
                want = captured[t - 1][name].numpy()
                np.testing.assert_array_equal(run.layer(name)[t], linear_tall(want))
                np.testing.assert_array_equal(run.layer(name).original(t), want)
    report = analyze(path)
    stab = report.stability
    assert set(stab["layer"]) == set(CONV1D_NAMES)
    assert stab["S"].notna().all()
    assert ((stab["S"] > 0) & (stab["S"] <= 1 + 1e-6)).all()


def test_factorize_converts_every_conv1d_exactly_and_keeps_the_tied_head_dense():
    model = tiny_gpt2()
    x = tokens()
    with torch.no_grad():
        before = model(input_ids=x).logits
    report = factorize_(model)
    assert sorted(report.converted) == sorted(CONV1D_NAMES)
    assert "tied to transformer.wte" in dict(report.skipped)["lm_head"]
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    for name in CONV1D_NAMES:
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankConv1D)
        assert layer.weight.shape == (layer.nx, layer.nf)  # (in, out), as Conv1D stores it
    with torch.no_grad():
        after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    state_keys = set(tiny_gpt2().state_dict())
    assert set(densify_(model).state_dict()) == state_keys
    assert all(type(model.get_submodule(n)) is Conv1D for n in CONV1D_NAMES)


def test_the_factor_is_the_recorded_matrix():
    model = tiny_gpt2()
    views = {v.name: v for v in select_layers(model).views}
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in CONV1D_NAMES}
    factorize_(model)
    for name, module in low_rank_layers(model).items():
        tall = factor_of(module).tall().detach()
        torch.testing.assert_close(tall, views[name].matrix(weights[name]), rtol=0, atol=1e-5)


def test_oialr_trains_gpt2_low_rank_and_exports_plain_linear_layers():
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    oialr = OIALR(model, opt, OIALRConfig(delay=3, interval=2, beta=0.9))
    losses = train_steps(model, opt, 9, oialr=oialr)
    assert np.isfinite(losses).all()
    assert [e["event"] for e in oialr.events][:2] == ["convert", "update"]
    assert sorted(oialr.layers) == sorted(CONV1D_NAMES)
    ranks = oialr.ranks()
    assert all(k <= WIDTH // 8 for k in ranks.values())  # three updates, each halving at most
    model.eval()
    exported = export_factorized(model)
    assert not low_rank_layers(exported)
    assert not any(isinstance(m, Conv1D) for m in exported.modules())  # thin nn.Linear pairs
    x = tokens(seed=99)
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-5
        )
    dense = densify_(copy.deepcopy(model))
    cmp = compare_export(dense, exported, x, repeats=3)
    # the dense Conv1D layers are counted: 2 blocks x (96 + 32 + 128 + 32) x 32 per token
    conv_macs = 2 * (96 * 32 + 32 * 32 + 128 * 32 + 32 * 128) * x.shape[1]
    head_macs = VOCAB * WIDTH * x.shape[1]
    assert cmp.macs_dense == count_macs(dense, x) == conv_macs + head_macs
    assert cmp.params_factorized < cmp.params_dense


def test_oialr_trainer_converts_gpt2(tmp_path):
    pytest.importorskip("accelerate")
    from basis_stability.integrations.hf import OIALRTrainer, RecordTrainerCallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x = tokens(n=32, length=8, seed=3)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    args = transformers.TrainingArguments(
        str(tmp_path / "out"),
        num_train_epochs=3,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
    )
    rc = RecordTrainerCallback(tmp_path / "run.h5")
    trainer = OIALRTrainer(
        tiny_gpt2(),
        args,
        train_dataset=Tokens(),
        callbacks=[rc],
        recorder=rc,
        # every Conv1D factorised, whatever its rank (tests/test_dense_when_larger.py: pay rule)
        oialr_config=OIALRConfig(delay=4, interval=4, beta=0.3, dense_when_larger=False),
    )
    trainer.train()
    assert sorted(low_rank_layers(trainer.model)) == sorted(CONV1D_NAMES)
    with bs.open_run(tmp_path / "run.h5") as run:
        assert run.layer_names == CONV1D_NAMES
        assert [e["event"] for e in run.events()][:1] == ["convert"]
        # the last snapshot holds the effective low-rank W, in the Linear's tall frame
        for name in CONV1D_NAMES:
            want = trainer.model.get_submodule(name).weight.detach().numpy()
            np.testing.assert_allclose(run.layer(name)[-1], linear_tall(want), atol=1e-6)

"""The reference preset: OIALRConfig.reference follows the authors' code rank for rank.

The expected ranks come from an oracle written here in plain Python from the reference's rules
(Helmholtz-AI-Energy/OIALR @ e9e885d, as read and measured in docs/oialr.md, "The reference
preset"), never from the authors' code. The reference's training call t runs before training
step t, after t - 1 optimizer steps: conversion and the first cut at call ``delay``, updates at
``delay + j * nu``; each update adds ``int((L - 1) * 0.1)`` to a count c and touches the last c
converted layers (c = 0: all of them, the reference's ``[-0:]``); a touched layer's k becomes
``k if count >= k else max(count, k // 2, int(0.01 * n))``.

With lr = 0 and weights of known spectra (0.5 ** i) the count at every update is known, so the
whole trajectory follows from the rules alone; a second test trains for real and checks each
update against the oracle rule applied to the S (and optimizer state) held just before it.
"""

from __future__ import annotations

import pytest
import torch
from helpers.cli import assert_clean_failure, bstab
from torch import nn

from basis_stability import open_run
from basis_stability.errors import ConfigError, NoEligibleLayersError
from basis_stability.lowrank.surgery import FactorizeConfig, eligible_layers, factorize_
from basis_stability.training.oialr import OIALR, OIALRConfig

STEPS = 60


# ---------------------------------------------------------------------------- the oracle
def oracle_new_k(k: int, count: int, n: int) -> int:
    """The reference's cut of one layer (its branches, not our formula)."""
    min_dim = int(n * 0.01)
    if count >= k:
        return k
    if count < k * 0.5 and k * 0.5 > min_dim:
        return int(k * 0.5)
    if count < min_dim:
        return min_dim
    return count


def oracle(layers: list[tuple[str, int]], delay: int, nu: int, count_of) -> dict[int, dict]:
    """``{t: {layer: k or None (full rank)}}``: the k each training step t (1-based) runs with.

    ``layers`` are the converted layers in registration order with their min dimension n;
    ``count_of(name, k)`` is the number of singular values of S >= beta * s_max at an update.
    """
    k = {name: None for name, _ in layers}
    n_of = dict(layers)
    names = [name for name, _ in layers]
    cum, due, table = 0, delay, {}
    for t in range(1, STEPS + 1):
        if t == delay:
            k = dict(n_of)
        if t == due:
            cum += int((len(names) - 1) * 0.1)
            for name in names[-cum:]:
                k[name] = oracle_new_k(k[name], count_of(name, k[name]), n_of[name])
            due += nu
        table[t] = dict(k)
    return table


def test_the_oracle_reproduces_the_measured_reference_tables():
    """Rows of the reference's own runs (docs/oialr.md): the oracle is not circular."""
    chain4 = oracle([(str(i), 16) for i in range(0, 8, 2)], 10, 5, lambda n, k: 1)
    assert [chain4[t]["0"] for t in (9, 10, 14, 15, 20, 25, 60)] == [None, 8, 8, 4, 2, 1, 1]
    chain12 = oracle([(str(i), 16) for i in range(0, 24, 2)], 10, 5, lambda n, k: 1)
    assert list(chain12[10].values()) == [16] * 11 + [8]
    assert list(chain12[25].values()) == [16] * 8 + [8, 4, 2, 1]
    assert list(chain12[60].values()) == [16, 8, 4, 2] + [1] * 8
    conv = oracle([("0", 8), ("2", 16), ("5", 32), ("7", 16)], 10, 5, lambda n, k: min(k, 2))
    assert list(conv[10].values()) == [4, 8, 16, 8]
    assert list(conv[20].values()) == [2, 2, 4, 2]
    assert list(conv[25].values()) == [2, 2, 2, 2]
    wide = oracle([("0", 200)], 10, 5, lambda n, k: 1)
    assert [wide[t]["0"] for t in range(10, 61, 5)] == [100, 50, 25, 12, 6, 3, 2, 2, 2, 2, 2]


# ---------------------------------------------------------------------------- models
def _set_spectrum(weight: torch.Tensor, gen: torch.Generator) -> None:
    """Give ``weight`` (viewed as out x fan-in) singular values 0.5 ** i in random bases."""
    out, fan_in = weight.shape[0], weight[0].numel()
    n = min(out, fan_in)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(fan_in, n, generator=gen, dtype=torch.float64))
    s = 0.5 ** torch.arange(n, dtype=torch.float64)
    weight.copy_((u * s @ v.T).reshape(weight.shape).to(weight.dtype))


def chain(depth: int, width: int = 16, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip


def designed(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                _set_spectrum(module.weight, gen)
    return model


def inputs(model: nn.Module) -> torch.Tensor:
    shape = (1, 8, 8) if isinstance(model[0], nn.Conv2d) else (model[0].in_features,)
    return torch.randn(32, *shape, generator=torch.Generator().manual_seed(1))


def trajectory(model, optimizer, cfg, before_step=None) -> tuple[OIALR, dict[int, dict]]:
    """Train STEPS steps; k of every converted layer as used by each step t (None: full rank)."""
    oialr = OIALR(model, optimizer, cfg)
    names = [name for name, _ in oialr.candidates]
    x = inputs(model)
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(2))
    seen = {}
    for t in range(1, STEPS + 1):
        ranks = oialr.ranks()
        seen[t] = {name: ranks.get(name) for name in names}
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if before_step is not None:
            before_step(oialr)
        oialr.step()
    return oialr, seen


def _rows(table: dict[int, dict]) -> list[tuple]:
    return [(t, *table[t].values()) for t in sorted(table)]


# ---------------------------------------------------------------------------- pinned trajectories
CASES = {
    # name: (model, beta, keep_last, converted (name, n), count of 0.5**i >= beta)
    "chain4": (lambda: chain(4), 0.6, True, [(str(i), 16) for i in range(0, 8, 2)], 1),
    "chain12": (lambda: chain(12), 0.6, True, [(str(i), 16) for i in range(0, 24, 2)], 1),
    "conv": (conv_net, 0.3, True, [("0", 8), ("2", 16), ("5", 32), ("7", 16)], 2),
    # beyond the three: an odd width pins floor(k/2) (10 -> 5 -> 2, not 3), and
    # n = 200 pins the 1 % floor (k stops at int(0.01 * 200) = 2, not 1)
    "odd": (lambda: chain(4, 10), 0.6, True, [(str(i), 10) for i in range(0, 8, 2)], 1),
    "wide": (lambda: chain(2, 200, 200), 0.6, True, [("0", 200), ("2", 200)], 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_rank_trajectory_every_step(case):
    build, beta, keep_last, layers, count = CASES[case]
    model = designed(build())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # weights fixed, state still kept
    cfg = OIALRConfig.reference(delay=10, interval=5, beta=beta, keep_last=keep_last)
    oialr, seen = trajectory(model, optimizer, cfg)
    expected = oracle(layers, 10, 5, lambda name, k: min(k, count))
    assert [name for name, _ in oialr.candidates] == [name for name, _ in layers]
    assert _rows(seen) == _rows(expected)
    assert oialr.ranks() == expected[STEPS]  # {layer name: k}, in registration order
    head = str(len(model) - 1)
    assert head in dict(oialr.skipped) and "keep_last" in dict(oialr.skipped)[head]


def test_bstab_default_differs_on_the_same_model():
    """Our default: conversion after `delay` completed steps with the first cut in the same call,
    all layers, ceil(k/2) cap stopping at the largest rank whose factors pay (7 of 16x16, not
    8); the same designed chain gives another trajectory (the preset matters)."""
    model = designed(chain(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    cfg = OIALRConfig(delay=10, interval=5, beta=0.6)
    _, seen = trajectory(model, optimizer, cfg)
    rows = (10, 11, 15, 16, 21, 26, 31)
    for name in ("0", "6"):
        assert [seen[t][name] for t in rows] == [None, 7, 7, 4, 2, 1, 1]
    # the head too (ratio 1.6 <= 10, no keep_last), and ceil(5/2) = 3 where the reference has 2
    assert [seen[t]["8"] for t in rows] == [None, 5, 5, 3, 2, 1, 1]


# ---------------------------------------------------------------------------- real training
def test_real_training_follows_the_rules_and_the_optimizer_state():
    """AdamW at lr 1e-2 on the 12-layer chain: every update checked against the oracle rule
    applied to the S and the optimizer state held just before it."""
    model = chain(12)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = OIALRConfig.reference(delay=10, interval=5, beta=0.6)
    held: dict[str, dict] = {}
    progress, later_cuts = {"cum": 0}, []

    def before(oialr: OIALR) -> None:  # after optimizer.step(), before oialr.step()
        held.clear()
        for name, module in oialr.layers.items():
            s = module.factor.S
            held[name] = {"S": s.detach().clone(), "id": id(s), **optimizer.state[s]}
            held[name] = {k: v.clone() if torch.is_tensor(v) else v for k, v in held[name].items()}

    oialr = OIALR(model, optimizer, cfg)
    names = [name for name, _ in oialr.candidates]
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    for s in range(1, STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
        w_state = {n: dict(optimizer.state[model.get_submodule(n).weight]) for n in names}
        before(oialr)
        ranks_before = oialr.ranks()
        oialr.step()
        due = s == 9 or (s > 9 and (s - 9) % 5 == 0)
        if s < 9:
            assert oialr.converted_at is None
            continue
        if s == 9:  # conversion and first cut after delay - 1 = 9 completed steps
            assert oialr.converted_at == 9 and list(oialr.layers) == names
            ranks_before = {n: 16 for n in names}
            held.update({n: _at_conversion(weights[n], w_state[n]) for n in names})
            for name in names[:-1]:  # converted, not yet cut: zero moments, the step kept
                state = optimizer.state[oialr.layers[name].factor.S]
                assert oialr.ranks()[name] == 16 and float(state["step"]) == 9.0
                assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        if not due:
            assert oialr.ranks() == ranks_before
            continue
        progress["cum"] += int((len(names) - 1) * 0.1)
        touched = names[-progress["cum"] :]
        for name in names:
            module, k_old = oialr.layers[name], ranks_before[name]
            k = oialr.ranks()[name]
            if name not in touched:
                assert k == k_old
                assert s == 9 or id(module.factor.S) == held[name]["id"]  # not even rotated
                continue
            sv = torch.linalg.svdvals(held[name]["S"].double())
            count = int((sv >= 0.6 * sv[0]).sum())
            assert k == oracle_new_k(k_old, count, 16) and k <= k_old
            if s > 9 and k < k_old:
                later_cuts.append((s, name, k_old, k))
            assert k >= max(1, k_old // 2)  # the cap: at most half per update
            state = optimizer.state[module.factor.S]
            assert state["step"] == held[name]["step"]  # step kept
            for key in ("exp_avg", "exp_avg_sq"):  # sliced to the top-left k x k, not rotated
                assert torch.equal(state[key], held[name][key][:k, :k].to(state[key].dtype))
    assert oialr.ranks()["22"] <= 8 and oialr.ranks()["0"] == 16  # "0" first updates at 65
    assert later_cuts  # cuts of trained S, whose moments are not zero: the slice is checked


def _at_conversion(weight: torch.Tensor, state: dict) -> dict:
    """What the reference holds right after conversion: S = diag(sigma(W)), zero moments, the
    dense weight's step count."""
    n = min(weight.shape)
    s = torch.linalg.svdvals(weight.double())
    zeros = torch.zeros(n, n)
    return {"S": torch.diag(s), "id": None, "step": state["step"], "exp_avg": zeros,
            "exp_avg_sq": zeros}  # fmt: skip


def test_conversion_keeps_step_and_zeroes_moments():
    model = chain(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    oialr = OIALR(model, optimizer, OIALRConfig.reference(delay=4, interval=100, beta=0.01))
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        oialr.step()
    assert oialr.converted_at == 3
    for module in oialr.layers.values():
        state = optimizer.state[module.factor.S]
        assert float(state["step"]) == 3.0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    bias = oialr.layers["0"].bias  # our biases keep training (the reference's freeze them)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(bias) in held


def test_delay_one_converts_before_the_first_step():
    model = designed(chain(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    oialr = OIALR(model, optimizer, OIALRConfig.reference(delay=1, interval=5, beta=0.6))
    assert oialr.converted_at == 0 and set(oialr.ranks().values()) == {8}


# ---------------------------------------------------------------------------- eligibility
def _elig(*modules: nn.Module, **kw) -> tuple[list[str], dict[str, str]]:
    chosen, skipped = eligible_layers(nn.Sequential(*modules), FactorizeConfig(**kw))
    return [n for n, _ in chosen], dict(skipped)


def test_reference_eligibility_rules():
    ref = {"aspect_rule": "reference"}
    # Linear: min > max / 10, strictly; ours keeps ratio 10 exactly
    assert _elig(nn.Linear(100, 10), **ref)[0] == []
    assert _elig(nn.Linear(100, 10))[0] == ["0"]
    assert _elig(nn.Linear(99, 10), **ref)[0] == ["0"]
    # conv: skipped iff fan-in < out / 10 (one-sided)
    assert _elig(nn.Conv2d(1, 90, 3), nn.Conv2d(512, 8, 3), nn.Conv2d(1, 91, 3), **ref)[0] == [
        "0",
        "1",
    ]
    chosen, skipped = _elig(nn.Conv3d(4, 4, 3), nn.MultiheadAttention(16, 2), **ref)
    assert "1" in chosen and "0" in skipped and "Conv3d" in skipped["0"]
    assert _elig(nn.Conv3d(4, 4, 3))[0] == ["0"]  # ours factorises Conv3d


def test_keep_last_is_the_last_eligible_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 1))
    chosen, skipped = eligible_layers(
        model, FactorizeConfig(aspect_rule="reference", keep_last=True)
    )
    assert [n for n, _ in chosen] == ["0"] and "keep_last" in dict(skipped)["1"]


# ---------------------------------------------------------------------------- bad input
def test_reference_with_auto_is_an_error():
    with pytest.raises(ConfigError, match="auto.*reference"):
        OIALRConfig.reference(delay=10, interval=5, beta=0.15, auto=True)
    with pytest.raises(ConfigError, match="auto"):
        OIALRConfig(auto=True, beta=None, preset="reference")


def test_keep_first_and_last_leaving_nothing_is_a_clear_error():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 10))
    optimizer = torch.optim.AdamW(model.parameters())
    cfg = OIALRConfig.reference(delay=10, interval=5, beta=0.15, keep_first=True)
    with pytest.raises(ConfigError) as err:
        OIALR(model, optimizer, cfg)
    text = str(err.value)
    for fragment in (
        "`keep_first=True`",
        "`keep_last=True`",
        "`keep_first=False`",
        "`keep_last=False`",
    ):
        assert fragment in text
    with pytest.raises(NoEligibleLayersError, match="keep_last=True"):
        factorize_(nn.Sequential(nn.Linear(4, 4)), FactorizeConfig(keep_last=True))


@pytest.mark.parametrize(
    ("field", "value"),
    [("delay_counts", "x"), ("first_cut", "x"), ("cap_rounding", "x"), ("progressive", 0.0)],
)
def test_bad_fields_name_themselves(field, value):
    with pytest.raises(ConfigError, match=field):
        OIALRConfig(delay=1, beta=0.1, **{field: value})


def test_reference_delay_zero_is_an_error():
    with pytest.raises(ConfigError, match="delay"):
        OIALRConfig.reference(delay=0, interval=5, beta=0.15)


# ---------------------------------------------------------------------------- the CLI
FAST = ("--model", "mlp", "--batch-size", "128", "--no-progress")


def test_cli_reference_preset_end_to_end(tmp_path):
    out = tmp_path / "ref.h5"
    args = ("--epochs", "2", "--delay", "1", "--beta", "0.6", "--interval", "1")
    result = bstab("train", *FAST, "--preset", "reference", *args, "-o", out)
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        names, values = run.metric_names, run.metrics_array()
    # mlp 64-256-256-10: the head fails the reference's Linear rule, keep_last keeps fc2
    assert "rank/fc1" in names and "rank/fc2" not in names and "rank/head" not in names
    ranks = values[:, names.index("rank/fc1")]
    # converted and cut at step 11 (before the 12th, the first of epoch 2): 32 <= k < 64
    assert ranks[0] != ranks[0] and 32 <= ranks[1] < 64 and ranks[-1] <= ranks[1]


def test_cli_reference_preset_no_keep_last(tmp_path):
    out = tmp_path / "ref.h5"
    args = ("--epochs", "1", "--delay", "1", "--beta", "0.2", "--interval", "1")
    result = bstab("train", *FAST, "--preset", "reference", "--no-keep-last", *args, "-o", out)
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        assert {"rank/fc1", "rank/fc2"} <= set(run.metric_names)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--preset", "reference", "--auto"), ("--preset reference", "--auto")),
        (
            ("--preset", "reference", "--keep-first", "--delay", "1"),
            ("`--keep-first` and `--keep-last`", "`--no-keep-first`"),
        ),
        (("--preset", "nope"), ("--preset",)),
    ],
)
def test_cli_reference_bad_input(args, fragments, tmp_path):
    out = tmp_path / "bad.h5"
    result = bstab("train", *FAST, "--epochs", "2", *args, "-o", out)
    assert_clean_failure(result, *fragments)
    assert not out.exists()


def test_the_progressive_count_survives_a_checkpoint():
    model = designed(chain(12))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    cfg = OIALRConfig.reference(delay=1, interval=1, beta=0.6)
    oialr = OIALR(model, optimizer, cfg)  # converted and first update before step 1
    oialr.step()  # update 2: the last two layers
    state = oialr.state()
    assert state["progress"] == 2
    again = OIALR(model, optimizer, cfg)
    again.load_state(state)
    again.step()  # update 3 touches the last three layers, not only the last one
    assert list(again.ranks().values())[-4:] == [16, 8, 4, 2]

"""The grouped MoE block: litgpt semantics, aux loss, aux-free balancing, capacity, config parsing."""

from __future__ import annotations

import math

import pytest
import torch
from litgpt import GPT, Config
from litgpt.model import LLaMAMoE

from litgpt_ext.model import (
    MoEArgs,
    MoEFeedForward,
    build_model,
    flatten_moe_stats,
    moe_aux_loss,
    moe_stats,
    split_model_config,
    to_litgpt_state_dict,
    update_router_biases,
)


def cfg(**kw) -> Config:
    base = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=64, padded_vocab_size=64, block_size=16,
                mlp_class_name="LLaMAMoE", intermediate_size=24, n_expert=4, n_expert_per_token=2,
                bias=False, norm_class_name="RMSNorm")
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("shared", [None, 2])
def test_matches_litgpt_llamamoe(shared):
    """Softmax top-k gates with renormalisation is litgpt's LLaMAMoE: same output, same gradients."""
    config = cfg(n_shared_expert=shared, moe_intermediate_size=8)
    torch.manual_seed(0)
    ref = LLaMAMoE(config)
    ours = MoEFeedForward(config)
    ours.load_state_dict(ref.state_dict())  # litgpt's per-expert layout loads into the stacked one
    x = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), ours(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    for i in range(4):
        torch.testing.assert_close(ours.experts.fc_1.grad[i], ref.experts[i].fc_1.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.experts.proj.grad[i], ref.experts[i].proj.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.gate.weight.grad, ref.gate.weight.grad, rtol=1e-5, atol=1e-6)
    # and back to litgpt's layout
    ref2 = LLaMAMoE(config)
    ref2.load_state_dict(to_litgpt_state_dict(ours.state_dict()), strict=True)
    torch.testing.assert_close(ref2(x.detach()), y.detach(), rtol=1e-5, atol=1e-6)
    assert ours.last_stats["tokens_per_expert"].sum() == 15 * 2


def test_matches_litgpt_group_limited_sigmoid_router():
    """litgpt's DeepSeek-V3 routing (GroupedTopkRouter: sigmoid, selection bias, group-limited top-k,
    norm_topk_prob, routed_scaling_factor) is reproduced with no MoE options given."""
    config = cfg(n_expert=8, n_expert_per_token=2, n_expert_groups=4, n_topk_groups=2, n_topk_scores_per_group=2,
                 norm_topk_prob=True, routed_scaling_factor=2.5, moe_intermediate_size=8)
    torch.manual_seed(0)
    ref = LLaMAMoE(config)
    with torch.no_grad():
        ref.gate.weight.normal_(0, 0.3)  # litgpt leaves it uninitialised (torch.empty)
        ref.gate.e_score_correction_bias.normal_(0, 0.1)
    ours = MoEFeedForward(config)
    assert (ours.moe.gate, ours.moe.normalize_gates) == ("sigmoid", True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_aux_loss_hand_checked():
    m = MoEFeedForward(cfg(n_expert=2, n_expert_per_token=1), MoEArgs(aux_loss_coef=0.1))
    scores = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    idx = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.7, 0.3]  ->  2 * (1 * 0.7 + 0 * 0.3) = 1.4
    assert m.aux_loss(scores, idx).item() == pytest.approx(1.4)
    # uniform scores (zero router): E * sum_i f_i / E = 1 whatever the tie-break; coef 0.1 per layer
    model = build_model(cfg(), MoEArgs(aux_loss_coef=0.1))
    for block in model.transformer.h:
        torch.nn.init.zeros_(block.mlp.gate.weight)
    model(torch.randint(0, 64, (2, 8)))
    assert moe_aux_loss(model).item() == pytest.approx(0.1 * 2 * 1.0)
    assert moe_aux_loss(build_model(cfg())).item() == 0.0  # no coefficient: zero


def test_aux_loss_free_bias_moves_towards_underloaded():
    m = MoEFeedForward(cfg(), MoEArgs(gate="sigmoid", bias_update_rate=0.1))
    m.load_since_update.copy_(torch.tensor([10.0, 0.0, 2.0, 4.0]))  # mean 4
    m.update_bias()
    torch.testing.assert_close(m.gate.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.1, 0.0]))
    assert m.load_since_update.sum() == 0

    # end to end: a bias that sends every token to expert 0 is balanced away by the updates
    model = build_model(cfg(n_layer=1, n_expert_per_token=1), MoEArgs(gate="sigmoid", bias_update_rate=0.1))
    for _, block in enumerate(model.transformer.h):
        block.mlp.gate.e_score_correction_bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    model(idx)
    first = moe_stats(model)[0]
    assert first["imbalance"] == pytest.approx(4.0)  # all 64 tokens on expert 0
    for _ in range(30):
        model(idx)
        update_router_biases(model)
    last = moe_stats(model)[0]
    assert last["imbalance"] < 2.0, last
    assert model.transformer.h[0].mlp.gate.e_score_correction_bias[0] < 2.0


def test_capacity_factor_drops_and_counts():
    config = cfg(n_expert_per_token=1)
    m = MoEFeedForward(config, MoEArgs(gate="sigmoid", normalize_gates=True, bias_update_rate=1e-3,
                                       capacity_factor=1.0))
    m.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # all tokens pick expert 0
    x = torch.randn(1, 8, 16)
    y = m(x)
    cap = math.ceil(1.0 * 8 * 1 / 4)  # 2 slots per expert
    assert m.last_stats["dropped_tokens"] == 8 - cap
    assert m.last_stats["tokens_per_expert"].tolist() == [8, 0, 0, 0]  # routed, before dropping
    assert torch.all(y[0, cap:] == 0)  # dropped tokens get no expert output (the residual carries them)
    e = m.experts
    x0 = x[0, :cap]
    expected = torch.nn.functional.linear(
        torch.nn.functional.silu(x0 @ e.fc_1[0].T) * (x0 @ e.fc_2[0].T), e.proj[0])  # gate weight 1 (k=1, normalised)
    torch.testing.assert_close(y[0, :cap], expected, rtol=1e-5, atol=1e-6)
    flat = flatten_moe_stats({0: m.last_stats})
    assert flat["moe/l0/dropped_tokens"] == 6 and flat["moe/l0/tokens_e0"] == 8


def test_dropless_by_default_and_stats_per_layer():
    model = build_model(cfg(n_layer=3), MoEArgs(aux_loss_coef=0.01))
    model(torch.randint(0, 64, (2, 8)))
    stats = moe_stats(model)
    assert sorted(stats) == [0, 1, 2]
    for s in stats.values():
        assert s["dropped_tokens"] == 0 and s["tokens_per_expert"].sum() == 2 * 8 * 2
        assert s["imbalance"] >= 1.0 and s["aux_loss"] > 0


def test_build_model_mixtral_shapes_on_meta():
    """litgpt's own MoE configs work; parameter count equals litgpt's LLaMAMoE model."""
    config = Config.from_name("Mixtral-8x7B-v0.1", n_layer=2)
    with torch.device("meta"):
        ours = build_model(config)
        ref = GPT(config)
    assert all(isinstance(b.mlp, MoEFeedForward) for b in ours.transformer.h)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(ours) == n(ref)
    assert ours.transformer.h[0].mlp.experts.fc_1.shape == (8, 14336, 4096)


def test_first_k_dense_replace_kept_dense():
    model = build_model(cfg(n_layer=3, first_k_dense_replace=1))
    kinds = [type(b.mlp).__name__ for b in model.transformer.h]
    assert kinds == ["LLaMAMLP", "MoEFeedForward", "MoEFeedForward"]


def test_split_model_config_and_errors():
    kw, moe = split_model_config({"n_expert": 4, "moe_intermediate_size": 8, "moe": {"gate": "sigmoid"},
                                  "moe_aux_loss_coef": 0.01})
    assert kw == {"n_expert": 4, "moe_intermediate_size": 8}
    assert moe == MoEArgs(gate="sigmoid", aux_loss_coef=0.01)
    assert split_model_config({"n_layer": 2}) == ({"n_layer": 2}, None)
    with pytest.raises(ValueError, match="unknown MoE key 'moe_gat'"):
        split_model_config({"moe_gat": "softmax"})
    with pytest.raises(ValueError, match="unknown MoE gate 'relu'; choose one of softmax, sigmoid"):
        MoEArgs(gate="relu")
    with pytest.raises(ValueError, match="n_expert=0"):
        build_model(cfg(n_expert=0, n_expert_per_token=0, mlp_class_name="LLaMAMLP"), MoEArgs())


def test_moe_tiny_demo_config_parses_and_builds(capsys):
    """The demo MoE config goes through the real CLI parser and builds a working model."""
    from pathlib import Path

    import yaml

    from litgpt_ext.cli import main

    path = Path(__file__).resolve().parents[1] / "midtrain_configs" / "demo" / "moe_tiny.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["moe"]["aux_loss_coef"] == 0.01 and printed["expert_parallel_size"] == 1
    raw = yaml.safe_load(path.read_text())
    model = build_model(Config(**raw["model_config"]), MoEArgs(**raw["moe"]))
    kinds = [type(b.mlp).__name__ for b in model.transformer.h]
    assert kinds == ["LLaMAMLP"] + ["MoEFeedForward"] * 3
    assert model(torch.randint(0, 4096, (1, 8))).shape == (1, 8, 4096)

"""Speed knobs (litgpt_ext.train.speed): config validation, FLOPs per token vs torch's FlopCounter,
MFU, fused optimizer choice, compile and activation checkpointing equal eager, meta-device init
equals the plain init (one process here; 2 processes in test_speed_dist.py)."""

from __future__ import annotations

import pytest
import torch
from litgpt import Config

from litgpt_ext.model import MoEArgs, build_model
from litgpt_ext.train import speed as sp
from litgpt_ext.train.speed import SpeedArgs


def dense_config(**kw) -> Config:
    base = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, padded_vocab_size=64, block_size=16, bias=True)
    base.update(kw)
    return Config(**base)


def moe_config(**kw) -> Config:
    base = dict(n_layer=3, n_embd=32, n_head=4, vocab_size=64, padded_vocab_size=64, block_size=16,
                mlp_class_name="LLaMAMoE", intermediate_size=48, moe_intermediate_size=24, n_expert=4,
                n_expert_per_token=2, bias=False, norm_class_name="RMSNorm", n_shared_expert=1,
                first_k_dense_replace=1)
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(compile="fast"), "speed.compile must be one of false, true, blocks, model; got 'fast'"),
        (dict(fused_optimizer="yes"), "speed.fused_optimizer must be true, false or auto, got 'yes'"),
        (dict(checkpoint_format="zip"), "speed.checkpoint_format must be full or sharded, got 'zip'"),
        (dict(peak_flops_per_device=-1.0), "speed.peak_flops_per_device must be a positive number"),
        (dict(activation_checkpointing="blocks"), "speed.activation_checkpointing must be true or false, got 'blocks'"),
        (dict(compile_backend=""), "speed.compile_backend must be a torch.compile backend name"),
    ],
)
def test_speed_args_errors_name_the_bad_value(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        SpeedArgs(**kw)


def test_compile_scope():
    assert SpeedArgs().compile_scope(False) is None
    assert SpeedArgs(compile=True).compile_scope(False) == "model"
    assert SpeedArgs(compile=True).compile_scope(True) == "blocks"
    assert SpeedArgs(compile="model").compile_scope(True) == "model"


def _measured_flops_per_token(model, seq: int, batch: int = 2) -> float:
    from lightning.fabric.utilities.throughput import measure_flops
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    # the math backend: FlopCounter has no formula for the CPU flash-attention kernel (it would count 0)
    with sdpa_kernel(SDPBackend.MATH):
        return measure_flops(model, lambda: model(x), lambda y: y.float().sum()) / (batch * seq)


@pytest.mark.parametrize(
    "cfg",
    [
        dense_config(),  # pythia-like: GptNeoxMLP, biases, parallel residual
        dense_config(mlp_class_name="LLaMAMLP", intermediate_size=40, n_query_groups=2, bias=False,
                     norm_class_name="RMSNorm", parallel_residual=False, padded_vocab_size=96),  # GQA, SwiGLU
    ],
    ids=["pythia", "llama-gqa"],
)
def test_flops_per_token_matches_flop_counter_dense(cfg):
    with torch.device("meta"):
        model = build_model(cfg)
    assert sp.flops_per_token(cfg, 16) == _measured_flops_per_token(model, 16)


@pytest.mark.slow
def test_flops_per_token_matches_flop_counter_moe():
    """Active parameters only: router + top-k routed + shared experts; first layer dense."""
    cfg = moe_config()
    torch.manual_seed(0)
    model = build_model(cfg, MoEArgs())  # routing needs real values (token counts), so not on meta
    assert sp.flops_per_token(cfg, 16) == _measured_flops_per_token(model, 16)
    assert sp.flops_per_token(cfg, 16, training=False) * 3 == sp.flops_per_token(cfg, 16)


def test_flops_per_token_by_hand_and_litgpt():
    cfg = Config.from_name("pythia-160m")
    d, L, V, T = 768, 12, 50304, 2048
    n = L * (4 * d * d + 8 * d * d) + d * V  # qkv+proj, 4x MLP up+down, head (matmul weights only)
    assert sp.flops_per_token(cfg, T) == 3 * (2 * n + L * 4 * T * d)
    # litgpt's estimate counts every parameter (incl. embeddings and norms): ~30% more for 160m
    from litgpt.utils import flops_per_param

    with torch.device("meta"):
        n_all = sum(p.numel() for p in build_model(cfg).parameters())
    litgpt = 3 * flops_per_param(T, L, d, n_all) / T
    assert 1.0 < litgpt / sp.flops_per_token(cfg, T) < 1.4


def test_mfu_and_peak_table():
    # 10k tok/s at 6e9 FLOPs/token on 2 devices of 100 TFLOP/s = 6e13 / 2e14 = 0.3
    assert sp.mfu(10_000, 6e9, 2, 100e12) == pytest.approx(0.3)
    assert sp.mfu(10_000, 6e9, 2, None) is None
    assert sp.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert sp.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert sp.peak_flops_for("NVIDIA H100 NVL") == 835e12
    assert sp.peak_flops_for("NVIDIA H200") == 989e12  # dense, not lightning's sparse 2e15
    assert sp.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert sp.peak_flops_for("NVIDIA L40S") == 362e12
    assert sp.peak_flops_for("NVIDIA L40") == 181e12
    assert sp.peak_flops_for("Some Future GPU") is None
    assert sp.device_peak_flops(SpeedArgs(peak_flops_per_device=5e12), torch.device("cpu")) == 5e12
    assert sp.device_peak_flops(SpeedArgs(), torch.device("cpu")) is None


def test_fused_optimizer_choice():
    cpu = torch.device("cpu")
    assert sp.optimizer_kwargs("AdamW", SpeedArgs(), cpu) == {}  # auto: CPU keeps torch's default (same numbers)
    assert sp.optimizer_kwargs("AdamW", SpeedArgs(fused_optimizer=True), cpu) == {"fused": True}  # torch 2.13 fuses on CPU
    assert sp.optimizer_kwargs({"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}, SpeedArgs(fused_optimizer=True), cpu) == {"fused": True}
    assert sp.optimizer_kwargs("AdamW", SpeedArgs(fused_optimizer=False), cpu) == {}
    assert sp.optimizer_kwargs("RMSprop", SpeedArgs(), cpu) == {}  # auto: quietly unfused
    with pytest.raises(ValueError, match="optimizer 'RMSprop' has no fused kernel"):
        sp.optimizer_kwargs("RMSprop", SpeedArgs(fused_optimizer=True), cpu)
    with pytest.raises(ValueError, match="device 'meta' has no fused optimizer kernels"):
        sp.optimizer_kwargs("AdamW", SpeedArgs(fused_optimizer=True), torch.device("meta"))
    # the kwargs work with litgpt's optimizer factory and train like the unfused optimizer
    from litgpt.utils import instantiate_torch_optimizer

    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
    w2 = [torch.nn.Parameter(p.detach().clone()) for p in w]
    fused = instantiate_torch_optimizer("AdamW", w, lr=0.1, **sp.optimizer_kwargs("AdamW", SpeedArgs(fused_optimizer=True), cpu))
    plain = instantiate_torch_optimizer("AdamW", w2, lr=0.1)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for a, b in zip(w, w2):
            a.grad = torch.sin(a.detach() * 3)
            b.grad = torch.sin(b.detach() * 3)
        fused.step()
        plain.step()
    for a, b in zip(w, w2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _loss(model, x):
    logits = model(x[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_matches_eager(scope):
    """Real dynamo tracing + AOT autograd (backend aot_eager: inductor's C++ build takes minutes on a
    loaded 2-core machine; benchmarks/compile_cpu.py runs inductor)."""
    torch.manual_seed(0)
    cfg = dense_config()
    ref = build_model(cfg)
    model = build_model(cfg)
    model.load_state_dict(ref.state_dict())
    sp.apply_speed(model, SpeedArgs(compile=scope, compile_backend="aot_eager"))
    assert model._litgpt_ext_compiled if scope == "model" else model.transformer.h[0]._litgpt_ext_compiled
    assert list(model.state_dict()) == list(ref.state_dict())  # keys unchanged (no _orig_mod.)
    x = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    lr, lm = _loss(ref, x), _loss(model, x)
    torch.testing.assert_close(lm, lr, rtol=1e-5, atol=1e-6)
    lr.backward()
    lm.backward()
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_activation_checkpointing_same_gradients_one_process():
    torch.manual_seed(0)
    cfg = moe_config()
    ref = build_model(cfg, MoEArgs(aux_loss_coef=0.01))
    model = build_model(cfg, MoEArgs(aux_loss_coef=0.01))
    model.load_state_dict(ref.state_dict())
    sp.apply_speed(model, SpeedArgs(activation_checkpointing=True))
    x = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    _loss(ref, x).backward()
    _loss(model, x).backward()
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("cfg", [dense_config(), moe_config()], ids=["dense", "moe"])
def test_meta_init_equals_plain_init_one_process(cfg):
    moe = MoEArgs() if cfg.n_expert else None
    plain = build_model(cfg, moe)
    sp.init_weights(plain, seed=7)
    with sp.empty_init_context(SpeedArgs(empty_init=True)):
        meta = build_model(cfg, moe)
    assert sp.has_meta(meta)
    sp.apply_speed(meta, SpeedArgs(empty_init=True), seed=7)
    assert not sp.has_meta(meta)
    for (n, a), b in zip(plain.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(a, b), n
    for (n, a), b in zip(plain.named_buffers(), meta.buffers()):
        assert torch.equal(a, b), n
    # litgpt's GPT-NeoX stds: proj 1/sqrt(C)/n_layer, the rest sqrt(2/5/C)
    proj = plain.transformer.h[0].attn.proj.weight
    assert abs(proj.std().item() - 1 / 32**0.5 / cfg.n_layer) < 0.02
    with pytest.raises(ValueError, match="needs the run's seed"):
        with torch.device("meta"):
            m = build_model(cfg, moe)
        sp.apply_speed(m, SpeedArgs(empty_init=True))

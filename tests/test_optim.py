"""The optimizers in optim.py: Newton-Schulz orthogonalisation, Muon's update size, which parameters
go to Muon and which to AdamW, and that a saved optimizer state continues exactly. (That Muon
learns faster is measured on real data, in BENCHMARKS.md, not asserted on a toy problem.)

    python -m pytest tests/test_optim.py -q
"""
import copy

import pytest
import torch

import lora
from minimind import PRESETS, MiniMind, ModelConfig
from optim import Muon, Optimizers, make_optimizer, orthogonalize


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])  # bf16: what CPUs with bf16 units and GPUs run
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 5), (64, 64), (4, 37, 11), (2, 3, 11, 40)])
def test_orthogonalize_gives_the_polar_factor_roughly(shape, dtype):
    torch.manual_seed(0)
    g = torch.randn(shape)
    u = orthogonalize(g, dtype=dtype)
    assert u.shape == g.shape and u.dtype == g.dtype
    # u shares g's singular vectors (it is an odd polynomial in g); each singular value s of
    # g / ||g||_F becomes p(s) with p 5 steps of the quintic: >= 0.6 once s > 0.005, and never > 1.25
    s_in = torch.linalg.svdvals(g) / g.norm(dim=(-2, -1), keepdim=True).squeeze(-1)
    s_out = torch.linalg.svdvals(u)
    assert s_out.max() < 1.25, s_out
    assert s_out[s_in > 0.005].min() > 0.6, (s_in, s_out)
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    polar = U @ Vh
    cos = (u * polar).sum((-2, -1)) / (u.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cos.min() > 0.95, cos  # ... with the singular vectors of g kept


def test_orthogonalize_ignores_the_scale_of_the_gradient():
    g = torch.randn(16, 24)
    torch.testing.assert_close(orthogonalize(g * 1e-4), orthogonalize(g * 1e3), atol=1e-4, rtol=1e-4)


def test_muon_update_has_adamw_rms_and_decoupled_weight_decay():
    torch.manual_seed(0)
    for shape in [(64, 64), (176, 64), (3, 40, 96)]:
        w = torch.nn.Parameter(torch.randn(shape))
        before = w.detach().clone()
        opt = Muon([w], lr=1e-2, weight_decay=0.0)
        w.grad = torch.randn(shape)
        opt.step()
        rms = (w.detach() - before).pow(2).mean().sqrt().item()
        assert 0.1 * 1e-2 < rms < 0.3 * 1e-2, (shape, rms)  # 0.2 * lr, the RMS of a typical AdamW step
    w = torch.nn.Parameter(torch.ones(8, 8))
    w.grad = torch.zeros(8, 8)  # no gradient signal: only the decay acts
    Muon([w], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(w.detach(), torch.full((8, 8), 0.95), atol=1e-3, rtol=0)


def groups_of(opt):
    """{id(param): optimizer name, weight decay} for every parameter an optimizer holds."""
    parts = opt.optimizers if isinstance(opt, Optimizers) else {"adamw": opt}
    return {id(p): (name, g["weight_decay"]) for name, o in parts.items() for g in o.param_groups for p in g["params"]}


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = MiniMind(PRESETS["tiny-moe"])
    where = groups_of(make_optimizer(model, "muon", 1e-3, 0.1, "cpu"))
    named = dict(model.named_parameters())
    assert len(where) == len(named)  # every parameter exactly once (the tied head is the embedding)
    for name, p in named.items():
        kind, wd = where[id(p)]
        if name == "embed.weight" or "router" in name:
            assert (kind, wd) == ("adamw", 0.1), name
        elif p.dim() == 1:
            assert (kind, wd) == ("adamw", 0.0), name
        else:  # attention projections and the (E, F, D) expert stacks
            assert (kind, wd) == ("muon", 0.1), name
    assert all(kind == "adamw" for kind, _ in groups_of(make_optimizer(model, "adamw", 1e-3, 0.1, "cpu")).values())


def test_lora_adapters_stay_with_adamw():
    model = MiniMind(PRESETS["tiny"])
    lora.apply_lora(model, 4, 8.0, "q,v,down")
    opt = make_optimizer(model, "muon", 1e-3, 0.1, "cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not isinstance(opt, Optimizers) and len(groups_of(opt)) == len(trainable) > 0


def test_optimizers_state_round_trip_continues_identically():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))

    def train(model, opt, steps):
        for _ in range(steps):
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad()

    torch.manual_seed(0)
    a = MiniMind(cfg)
    opt_a = make_optimizer(a, "muon", 1e-2, 0.1, "cpu")
    train(a, opt_a, 3)
    b = MiniMind(cfg)
    b.load_state_dict(a.state_dict())
    opt_b = make_optimizer(b, "muon", 1e-2, 0.1, "cpu")
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as train.py saves and loads it
    for opt in (opt_a, opt_b):  # as the training loop sets the schedule's lr (after loading, too)
        for group in opt.param_groups:
            group["lr"] = 3e-3
    train(a, opt_a, 2)
    train(b, opt_b, 2)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n



def test_newton_schulz_runs_in_bf16_only_where_the_cpu_has_bf16_units(monkeypatch):
    import optim
    model = MiniMind(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64))
    for has, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(optim, "cpu_has_bf16", lambda: has)
        assert make_optimizer(model, "muon", 1e-3, 0.1, "cpu").optimizers["muon"].ns_dtype == expected

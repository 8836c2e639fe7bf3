"""Model tests: presets, attention/cache equivalences, MoE routing, compile, generation.

    python -m pytest tests/test_model.py -q
"""
import pytest
import torch
import torch.nn.functional as F

from minimind import PRESETS, MiniMind, ModelConfig, Sampler, SamplingParams, cpu_gemv

SMALL = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)


@pytest.mark.parametrize("name,total,active", [
    ("minimind2-small", 25.8, 25.8), ("minimind2", 104.0, 104.0), ("minimind-3", 63.9, 63.9),
    ("minimind-3-moe", 198.4, 63.9), ("minimind2-moe", 145.0, None),
])
def test_preset_parameter_counts(name, total, active):
    with torch.device("meta"):
        model = MiniMind(PRESETS[name])
    assert round(model.num_params() / 1e6, 1) == total
    if active is not None:
        assert round(model.num_params(active=True) / 1e6, 1) == active


def test_all_presets_share_the_architecture():
    for name, cfg in PRESETS.items():
        assert cfg.vocab_size == 6400 and cfg.rope_theta == 1e6, name
        with torch.device("meta"):
            m = MiniMind(cfg)
        assert m.lm_head.weight is m.embed.weight, "embeddings are tied"
        assert not any(n.endswith("bias") for n, _ in m.named_parameters()), "no biases"


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True}, {"n_experts": 3, "top_k": 2, "n_shared_experts": 1}])
def test_kv_cache_decoding_matches_full_forward(extra):
    torch.manual_seed(0)
    m = MiniMind(ModelConfig(**SMALL, **extra)).eval()
    idx = torch.randint(0, 300, (2, 17))
    full, _ = m(idx)
    cache = m.new_cache(2, 32)
    outs = [m(idx[:, :9], cache=cache)[0][:, -1]]  # prefill
    outs += [m(idx[:, t:t + 1], cache=cache)[0][:, -1] for t in range(9, 13)]  # one token at a time
    outs += [m(idx[:, 13:], cache=cache)[0][:, -1]]  # a chunk after the past
    for got, t in zip(outs, [8, 9, 10, 11, 12, 16]):
        torch.testing.assert_close(got, full[:, t], atol=1e-5, rtol=1e-5)
    # the cache is preallocated and written in place
    assert cache.max_len == 32 and cache.len == 17


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_eager_cpu_decoding_splits_weight_rows_between_threads(threads, monkeypatch):
    """cpu_gemv, the eager few-rows matmul on CPU: one bmm over `threads` slices of W's rows where they
    divide evenly and W is large (F.linear's gemv runs on one thread), F.linear otherwise; the same
    values either way, and KV-cache decoding through it still matches the full forward."""
    bmms = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: bmms.append(a[1].shape) or bmm(*a))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        for rows, out, width, bias in [(1, 12, 11000, False), (4, 12, 11000, True), (3, 7, 20000, False),
                                       (1, 12, 40, False)]:
            w, x = torch.randn(out, width), torch.randn(1, rows, width)
            b = torch.randn(out) if bias else None
            bmms.clear()
            with torch.no_grad():
                got = cpu_gemv(x, w, b)
            torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-5)
            split = threads > 1 and out % threads == 0 and width > 40
            assert bmms == ([(threads, width, out // threads)] if split else []), (rows, out, width)
        with torch.enable_grad():  # training never takes the split
            bmms.clear()
            cpu_gemv(torch.randn(1, 11000), torch.randn(12, 11000, requires_grad=True))
            assert bmms == []
        m = MiniMind(ModelConfig(vocab_size=300, dim=512, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384)).eval()
        idx = torch.randint(0, 300, (1, 12))
        with torch.no_grad():
            full, _ = m(idx)
            cache = m.new_cache(1, 16)
            m(idx[:, :8], cache=cache)
            bmms.clear()
            steps = [m(idx[:, t:t + 1], cache=cache)[0][0, -1] for t in range(8, 12)]
        torch.testing.assert_close(torch.stack(steps), full[0, 8:12], atol=1e-5, rtol=1e-5)
        assert bool(bmms) == (threads > 1)
    finally:
        torch.set_num_threads(saved)


def test_kv_cache_overflow_is_an_error():
    m = MiniMind(ModelConfig(**SMALL)).eval()
    cache = m.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        m(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_left_padded_batch_matches_single_prompts():
    torch.manual_seed(1)
    m = MiniMind(ModelConfig(**SMALL)).eval()
    prompts = [torch.randint(3, 300, (n,)) for n in (3, 11, 7)]
    T = max(len(p) for p in prompts)
    idx = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    pad = torch.tensor([T - len(p) for p in prompts])
    batched = m.generate(idx, 12, temperature=0, pad=pad)
    for i, p in enumerate(prompts):
        alone = m.generate(p[None], 12, temperature=0)
        assert torch.equal(batched[i, pad[i]:], alone[0])


def test_packed_documents_do_not_attend_across():
    torch.manual_seed(2)
    m = MiniMind(ModelConfig(**SMALL)).eval()
    a, b = torch.randint(0, 300, (1, 6)), torch.randint(0, 300, (1, 5))
    idx = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 6 + [1] * 5])
    pos = torch.tensor([list(range(6)) + list(range(5))])
    packed, _ = m(idx, doc=doc, pos=pos)
    torch.testing.assert_close(packed[:, :6], m(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 6:], m(b)[0], atol=1e-5, rtol=1e-5)


def test_top1_router_learns_from_the_lm_loss():
    # MiniMind renormalises a single top-1 weight to 1.0, so its router gets gradient only from the
    # aux loss. Here, with the aux loss off, the router must still get gradient.
    torch.manual_seed(3)
    m = MiniMind(ModelConfig(**SMALL, n_experts=4, top_k=1, norm_topk=True, aux_loss_coef=0.0)).train()
    idx = torch.randint(0, 300, (2, 16))
    _, loss = m(idx, idx)
    loss.backward()
    for block in m.layers:
        assert block.ffn.router.weight.grad.abs().sum() > 0


def test_moe_aux_loss_is_added_and_balanced_routing_gives_one():
    torch.manual_seed(4)
    cfg = ModelConfig(**SMALL, n_experts=4, top_k=2, aux_loss_coef=0.5)
    m = MiniMind(cfg).train()
    idx = torch.randint(0, 300, (2, 16))
    logits, loss = m(idx, idx)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 300), idx.view(-1))
    aux = sum(b.ffn.aux_loss for b in m.layers)
    torch.testing.assert_close(loss, ce + 0.5 * aux)
    for b in m.layers:  # E * sum f_e P_e >= ~1 (1 = perfectly uniform)
        assert 0.9 < b.ffn.aux_loss.item() < 4.0


def test_moe_top_k_equals_dense_sum_of_experts():
    # with k = E and renormalisation the MoE output is the prob-weighted sum of all experts
    torch.manual_seed(5)
    cfg = ModelConfig(**SMALL, n_experts=3, top_k=3)
    moe = MiniMind(cfg).layers[0].ffn.eval()
    x = torch.randn(1, 5, 64)
    probs = moe.router(x).softmax(-1)
    ref = sum(probs[..., e:e + 1] * (torch.nn.functional.silu(x @ moe.w1[e].T) * (x @ moe.w3[e].T)) @ moe.w2[e].T
              for e in range(3))
    torch.testing.assert_close(moe(x), ref, atol=1e-5, rtol=1e-5)


def test_dense_model_compiles_without_graph_breaks():
    torch._dynamo.reset()
    m = MiniMind(ModelConfig(**SMALL, qk_norm=True)).train()
    compiled = torch.compile(m, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    idx = torch.randint(0, 300, (2, 16))
    _, loss = compiled(idx, idx)
    _, ref = m(idx, idx)
    torch.testing.assert_close(loss, ref)
    loss.backward()


def test_loss_ignores_minus_one_targets():
    m = MiniMind(ModelConfig(**SMALL)).eval()
    idx = torch.randint(0, 300, (1, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = m(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits[0, 4:], idx[0, 4:])
    torch.testing.assert_close(loss, ref)


def test_yarn_keeps_short_context_close_and_extends_rope():
    cfg = ModelConfig(**SMALL, rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64})
    torch.manual_seed(6)
    m = MiniMind(cfg).eval()
    idx = torch.randint(0, 300, (1, 300))
    logits, _ = m(idx)  # beyond the rope table's initial size is fine
    assert torch.isfinite(logits).all()
    # high-frequency dims are untouched, low-frequency dims are interpolated by the factor
    from minimind import yarn_inv_freq
    inv, attn = yarn_inv_freq(16, 1e6, cfg.rope_scaling)
    base = 1.0 / (1e6 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.isclose(inv[0], base[0]) and torch.isclose(inv[-1], base[-1] / 4)
    assert attn == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)


def draws(logits, n=50, **settings):
    """The set of tokens sampled from logits (1, V) in n draws."""
    s = Sampler(logits.shape[-1], "cpu")
    s.add([SamplingParams(seed=0, **settings)], torch.zeros(1, 1, dtype=torch.long))
    return {s.sample(logits).item() for _ in range(n)}


def test_sampling_controls():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    assert draws(logits, 3, temperature=0) == {1}  # greedy
    assert draws(logits, top_k=2) == {1, 2}  # top-k keeps the two best
    assert draws(logits, top_p=0.3) == {1}  # top-p 0.3: only the most likely token
    assert draws(logits, temperature=1e-300) == {1}  # a tiny temperature is greedy, not NaN
    assert draws(logits, top_k=10 ** 30) == draws(logits)  # k beyond the vocabulary: off


def test_penalties_follow_openai_and_ctrl():
    # frequency: -p * count, presence: -p once, repetition: / p for positive, * p for negative logits
    s = Sampler(4, "cpu")
    s.add([SamplingParams(temperature=0, frequency_penalty=1.0), SamplingParams(temperature=0, presence_penalty=2.0),
           SamplingParams(temperature=0, repetition_penalty=2.0)], torch.tensor([[3], [3], [3]]))
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]] * 3)
    assert s.sample(logits).tolist() == [0, 0, 0]
    s.update(torch.tensor([0, 0, 0]))
    # row 0: 3 - 1 = 2 < 2.5; row 1: 3 - 2 = 1 < 2.5; row 2: 3 / 2 = 1.5 < 2.5
    assert s.sample(logits).tolist() == [1, 1, 1]
    s.update(torch.tensor([0, 1, 0]))
    # row 0: token 0 seen twice, 3 - 2 = 1; row 1: presence is not counted twice, 2.5 - 2 vs 3 - 2
    assert s.sample(logits).tolist() == [1, 0, 1]
    s.keep([2])  # rows leave: the remaining row keeps its state
    assert s.sample(torch.tensor([[3.0, 2.0, 0.0, -1.0]])).tolist() == [1]


def test_sampler_rows_are_independent_and_nan_rows_are_flagged():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    alone = Sampler(50, "cpu")
    alone.add([SamplingParams(seed=7, top_p=0.9)], torch.zeros(1, 1, dtype=torch.long))
    together = Sampler(50, "cpu")
    together.add([SamplingParams(seed=1), SamplingParams(seed=7, top_p=0.9), SamplingParams(temperature=0)],
                 torch.zeros(3, 1, dtype=torch.long))
    for _ in range(20):  # row 1 of the batch draws exactly what it draws alone
        assert together.sample(logits)[1] == alone.sample(logits[1:2])[0]
    bad = logits.clone()
    bad[0, 3] = float("nan")
    out = together.sample(bad)
    assert out[0] == -1 and out[1] >= 0 and out[2] == logits[2].argmax()
    for bad_value in (float("nan"), float("inf"), -1.0, 1e-300, 2 ** 64):
        with pytest.raises(ValueError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad_value)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2 ** 64)


def test_generate_repetition_penalty_and_eos():
    torch.manual_seed(7)
    m = MiniMind(ModelConfig(**SMALL)).eval()
    idx = torch.randint(3, 300, (2, 5))
    penal = m.generate(idx, 20, temperature=0, repetition_penalty=1e4)
    for b in range(2):  # a huge penalty forbids any token already in the row, prompt included
        row = penal[b].tolist()
        assert len(set(row[5:])) == 20 and not set(row[5:]) & set(row[:5])
    sampled = m.generate(idx[:1], 20, seed=0)[0, 5:].tolist()
    first_new = next(i for i, t in enumerate(sampled) if t not in sampled[:i] and i >= 1)
    eos = sampled[first_new]  # stop at a token that first appears at step first_new
    out = list(m.generate_stream(idx[:1], 20, eos_id=eos, seed=0))
    assert len(out) == first_new + 1 and int(out[-1][0]) == eos

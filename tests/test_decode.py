"""The compiled decode step (MiniMind.decode_step, MiniMind.step): static-shape decoding over the
whole KV cache gives the tokens eager decoding gives, alone, in a left-padded batch, for a MoE model
and in the continuous-batching engine. Two tests compile (tens of seconds on a CPU the first time,
seconds once inductor's cache is warm); the others run decode_step eagerly.

    python -m pytest tests/test_decode.py -q
"""
import pytest
import torch
import torch.nn.functional as F

from engine import Engine, GenRequest
from minimind import WINDOW, Linear, MiniMind, ModelConfig, SamplingParams, cache_slots, left_pad

SMALL = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, qk_norm=True)
MOE = dict(SMALL, n_experts=4, top_k=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def model(cfg: dict, seed: int = 0) -> MiniMind:
    torch.manual_seed(seed)
    return MiniMind(ModelConfig(**cfg)).eval()


def prompts(lengths, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def test_decode_step_matches_forward():
    """decode_step run eagerly: attention over a window of the whole cache, the unfilled and the
    padding slots masked, gives the logits forward gives over the filled slots, across windows."""
    m = model(SMALL)
    idx, pad = left_pad(prompts((5, 120, 60)))
    ref, static = m.new_cache(3, 140, pad), m.new_cache(3, 140, pad)
    logits = m(idx, cache=ref)[0][:, -1]
    m(idx, cache=static)
    for window in [128] * 8 + [256] * 12:  # slots 120..139: the window grows past 128
        tok = logits.argmax(-1)
        got = MiniMind.decode_step(m, tok, static.k, static.v, static.pads, static.at, torch.arange(window))
        static.advance()
        logits = m(tok[:, None], cache=ref)[0][:, -1]
        torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-5)
    assert static.len == ref.len == 140
    torch.testing.assert_close(static.k[:, :, :, :140], ref.k[:, :, :, :140])


def test_cache_never_has_a_window_length():
    # torch.compile would give the two the same symbol and recompile when they part
    for n in (1, 5, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW, 1000):
        s = cache_slots(n)
        assert s >= n and s % WINDOW and s - 1 >= -(-n // WINDOW) * WINDOW


@pytest.mark.parametrize("cfg,batches", [(SMALL, (3, 1)), (MOE, (3,))], ids=["dense", "moe"])
def test_compiled_greedy_equals_eager(cfg, batches):
    """Token for token: a left-padded batch (and one prompt), long enough to cross a window; then another
    batch size, cache length and padding reuse the graph (one for several rows) without recompiling."""
    m = model(cfg)
    idx, pad = left_pad(prompts((7, 19, 12)))
    n = WINDOW + 10 - idx.shape[1]
    for rows in batches:
        eager = m.generate(idx[-rows:], n, temperature=0, pad=pad[-rows:])
        compiled = m.generate(idx[-rows:], n, temperature=0, pad=pad[-rows:], compiled=True)
        assert torch.equal(compiled, eager), f"{rows} rows"
    idx, pad = left_pad(prompts((4, 9), seed=2))
    with torch.compiler.set_stance("fail_on_recompile"):  # new batch size, cache length, padding
        compiled = m.generate(idx, 30, temperature=0, pad=pad, compiled=True)
    assert torch.equal(compiled, m.generate(idx, 30, temperature=0, pad=pad))


@torch.no_grad()
@pytest.mark.parametrize("rows,op", [(1, "sum"), (4, "sum"), (6, "bmm"), (16, "bmm"), (17, "linear")])
def test_compiled_cpu_linear_by_rows(rows, op):
    """What a traced minimind.Linear computes on CPU, by rows: up to DECODE_ROWS a multiply-and-sum (one
    streaming pass over W), up to SPLIT_ROWS one bmm over COMPILED_SLICES slices of W's rows (MKL runs
    a few rows' sgemm on fewer threads than it has), then F.linear; the values are F.linear's."""
    graphs = []

    def capture(gm, example_inputs):  # the FX graph dynamo traced, run as it is
        graphs.append(gm.code)
        return gm.forward

    torch.manual_seed(0)
    lin = Linear(512, 256 + 8, bias=False)  # 135k weights: large enough to split
    x = torch.randn(rows, 512)
    got = torch.compile(lin, backend=capture, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(got, F.linear(x, lin.weight), atol=1e-5, rtol=1e-5)
    calls = {"sum": "sum(", "bmm": "torch.bmm", "linear": "torch._C._nn.linear"}
    assert [k for k, call in calls.items() if call in graphs[0]] == [op], graphs[0]


def test_engine_compiled_equals_eager():
    """Continuous batching with the compiled step: requests join mid-flight (a shorter prompt padded,
    a longer one shifting the batch) and leave; every request gets the tokens of the eager engine."""
    m = model(SMALL)
    greedy = SamplingParams(temperature=0)

    def serve(compile: bool):
        engine = Engine(m, eos_id=2, max_batch=4, compile=compile)
        reqs = [GenRequest(prompt=p, max_tokens=k, params=greedy, ignore_eos=True)
                for p, k in zip(prompts((9, 30, 3, 14), seed=3), (40, 12, 25, 6))]
        joins = {0: reqs[:1], 5: reqs[1:2], 9: reqs[2:]}  # step -> requests submitted then
        step = 0
        while engine.rows or step <= max(joins):  # the engine loop's body, in this thread: admit, step
            for r in joins.get(step, ()):
                engine.submit(r)
            engine._admit()
            if engine.rows:
                engine._step()
            step += 1
        out = []
        for r in reqs:
            events = []
            while not r.events.empty():
                events.append(r.events.get_nowait())
            out.append(events)
        assert not engine.rows
        return out

    eager = serve(False)
    assert [e[-1] for e in eager] == [("end", "length", k) for k in (40, 12, 25, 6)]
    assert serve(True) == eager

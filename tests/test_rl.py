"""rl/: advantages, GRPO / CISPO / PPO losses against hand-computed values and gradients, GAE against
a plain loop, rewards on crafted completions, reward specs, the tool sandbox, the task generator and
the reward-model wrapper.

    OMP_NUM_THREADS=1 python -m pytest tests/test_rl.py -q
"""
import ast
import json
import math
import random
import re

import pytest
import torch

import rl
from rl.tasks import _TOOL_UNITS
from rl.tools import _params
from tokenizer import render_chat
from conftest import ROOT


# -----------------------------------------------------------------------------
# advantages, log-probs, masks

def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two prompts, G = 3
    std = math.sqrt(2 / 3)  # population std of 1, 2, 3
    want = [-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0, 0.0]
    assert rl.group_advantages(r, 3).tolist() == pytest.approx(want, abs=1e-6)
    assert rl.group_advantages(r, 3, eps=0.5)[2].item() == pytest.approx(1 / (std + 0.5))


def test_gather_logprobs_fp32_masked():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[1, 4] = -1  # ignored target
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    want = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    want = want * mask * (targets >= 0)
    got = rl.gather_logprobs(logits, targets, mask)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
    assert got[0, 3] == 0 and got[1, 4] == 0
    half = rl.gather_logprobs(logits.bfloat16(), targets, mask)  # bf16 logits, fp32 result
    assert half.dtype == torch.float32 and torch.allclose(half, want, atol=0.05)
    logits.requires_grad_(True)  # differentiable
    rl.gather_logprobs(logits, targets, mask).sum().backward()
    assert logits.grad[0, 3].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0


def test_completion_mask_up_to_first_eos():
    ids = torch.tensor([[5, 6, 2, 2], [2, 2, 2, 2], [5, 6, 7, 8]])
    want = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert rl.completion_mask(ids, eos_id=2).tolist() == want


def tiny_minimind(seed=0, sharpen=30.0):
    from minimind import MiniMind, ModelConfig
    torch.manual_seed(seed)
    model = MiniMind(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
    with torch.no_grad():  # logits further apart than at the usual init (which predicts near-uniformly)
        model.norm.weight.mul_(sharpen)
    return model


def test_completion_logprobs_padded_rows_score_as_alone():
    model = tiny_minimind().eval()
    prompts = [[5, 9, 11, 3, 7], [8, 4]]
    completion = torch.tensor([[12, 13, 14, 2], [20, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    pad = torch.tensor([0, 3])
    prompt = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    with torch.no_grad():
        got = rl.completion_logprobs(model, prompt, completion, mask, pad)
        for b in range(2):
            ids = torch.tensor([prompts[b] + completion[b].tolist()])
            logits, _ = model(ids)
            want = logits[0, len(prompts[b]) - 1:-1].log_softmax(-1).gather(-1, completion[b, :, None]).squeeze(-1)
            assert torch.allclose(got[b], want * mask[b], atol=1e-5), b


def test_one_grpo_step_on_minimind_moves_towards_the_better_completions():
    """Rollout with generate_stream, rewards, group advantages, GRPO loss, one SGD step: to first order
    sum_b A_b * (log pi_new(o_b) - log pi_old(o_b)) > 0 - the update favours the better completions.
    This is the contract of the pieces the training loop strings together."""
    model = tiny_minimind(1, sharpen=3.0)
    P, G, R, eos = 2, 4, 6, 2
    prompt = torch.tensor([[5, 9, 11], [8, 4, 6]]).repeat_interleave(G, dim=0)  # (P*G, 3)
    model.eval()
    completion = torch.stack(list(model.generate_stream(prompt, R, temperature=1.0, eos_id=eos, seed=0)), 1)
    mask = rl.completion_mask(completion, eos)  # (P*G, R')
    rewards = (completion == 7).float().mul(mask).sum(1) + torch.arange(P * G) % 3  # any varied reward
    adv = rl.group_advantages(rewards, G)
    model.train()
    logp = rl.completion_logprobs(model, prompt, completion, mask)
    old = logp.detach()  # on-policy: ratio 1, the gradient is the policy gradient
    loss, m = rl.grpo_loss(logp, old, adv, mask, ref_logp=old, beta=0.04)
    assert m["ratio"].item() == pytest.approx(1) and m["kl"].item() == pytest.approx(0, abs=1e-6)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad
        new = rl.completion_logprobs(model, prompt, completion, mask)
    seq_gain = ((new - old) * mask).sum(1) / mask.sum(1)  # (P*G,) mean log-prob change per completion
    assert (adv * seq_gain).sum().item() > 0
    assert torch.equal(torch.sign(seq_gain), torch.sign(adv))  # here every completion moves its own way


def test_whiten_masked():
    torch.manual_seed(0)
    x = torch.randn(3, 6) * 4 + 2
    mask = torch.ones(3, 6)
    mask[1, 3:] = 0
    w = rl.whiten(x, mask)
    assert rl.masked_mean(w, mask).item() == pytest.approx(0, abs=1e-5)
    assert rl.masked_mean(w ** 2, mask).item() == pytest.approx(1, abs=1e-4)
    assert (w[1, 3:] == 0).all()


# -----------------------------------------------------------------------------
# losses

def test_kl_k3_nonnegative_zero_at_equality_and_gradient():
    torch.manual_seed(0)
    logp = torch.randn(4, 7, requires_grad=True)
    ref = torch.randn(4, 7)
    kl = rl.kl_k3(logp, ref)
    assert (kl >= 0).all()
    assert torch.equal(rl.kl_k3(ref, ref), torch.zeros_like(ref))
    kl.sum().backward()
    assert torch.allclose(logp.grad, 1 - torch.exp(ref - logp.detach()), atol=1e-6)


# hand-computed case: ratios r = exp(logp - old) and advantages A
LOGP = [[-1.0, -2.0, -0.5], [-1.5, -0.3, -1.0]]
RATIO = [[1.5, 1.0, 0.9], [0.5, 1.5, 1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -1.0]


def _case():
    logp = torch.tensor(LOGP, requires_grad=True)
    old = torch.tensor(LOGP) - torch.log(torch.tensor(RATIO))
    return logp, old, torch.tensor(ADV), torch.tensor(MASK)


def test_grpo_loss_hand_computed():
    logp, old, adv, mask = _case()
    loss, m = rl.grpo_loss(logp, old, adv, mask, eps=0.2)
    # row 0 (A = +1): -min(r, clip(r, .8, 1.2)) = -1.2, -1.0, -0.9      mean -31/30
    # row 1 (A = -1): -min(-r, -clip(r)) = +0.8, +1.5 (third token masked) mean 1.15
    assert loss.item() == pytest.approx((-3.1 / 3 + 1.15) / 2, abs=1e-6)
    loss.backward()
    # gradient wrt logp: -A * r where the unclipped branch is the minimum, 0 where the clipped one is
    want = [[0.0, -1.0 / 3 / 2, -0.9 / 3 / 2], [0.0, 1.5 / 2 / 2, 0.0]]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in want]
    assert m["clip_frac"].item() == pytest.approx(3 / 5)  # 1.5, 0.5, 1.5 outside [0.8, 1.2]
    assert m["ratio"].item() == pytest.approx((1.5 + 1.0 + 0.9 + 0.5 + 1.5) / 5)
    assert "kl" not in m and not m["loss"].requires_grad


def test_grpo_loss_token_mean_and_clip_higher():
    logp, old, adv, mask = _case()
    loss, _ = rl.grpo_loss(logp, old, adv, mask, eps=0.2, token_mean=True)
    assert loss.item() == pytest.approx((-1.2 - 1.0 - 0.9 + 0.8 + 1.5) / 5, abs=1e-6)
    loss, m = rl.grpo_loss(logp, old, adv, mask, eps=0.2, eps_high=0.6)  # DAPO clip-higher: 1.5 is inside
    assert loss.item() == pytest.approx((-(1.5 + 1.0 + 0.9) / 3 + (0.8 + 1.5) / 2) / 2, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(1 / 5)


def test_grpo_loss_kl_term():
    logp, old, adv, mask = _case()
    ref = torch.tensor(LOGP) + torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, 9.0]])
    base, _ = rl.grpo_loss(logp, old, adv, mask)
    with_kl, m = rl.grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    k3 = rl.kl_k3(torch.tensor(LOGP), ref)
    per_seq = [(k3[0].sum() / 3).item(), (k3[1, :2].sum() / 2).item()]
    assert (with_kl - base).item() == pytest.approx(0.1 * sum(per_seq) / 2, abs=1e-6)
    assert m["kl"].item() == pytest.approx((k3[0].sum() + k3[1, :2].sum()).item() / 5, abs=1e-6)
    with pytest.raises(ValueError):
        rl.grpo_loss(logp, old, adv, mask, beta=0.1)  # no reference


def test_cispo_loss_hand_computed():
    logp, old, adv, mask = _case()
    loss, m = rl.cispo_loss(logp, old, adv, mask, eps_high=0.2)  # w = clip(r, max=1.2), detached
    w = [[1.2, 1.0, 0.9], [0.5, 1.2, 1.0]]
    row0 = -sum(wi * 1.0 * li for wi, li in zip(w[0], LOGP[0])) / 3
    row1 = -sum(wi * -1.0 * li for wi, li in zip(w[1][:2], LOGP[1][:2])) / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    loss.backward()
    # d loss / d logp = -w * A / len / B: the weight is a constant, every token keeps a gradient
    want = [[-wi * 1.0 / 3 / 2 for wi in w[0]], [-w[1][0] * -1.0 / 2 / 2, -w[1][1] * -1.0 / 2 / 2, 0.0]]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in want]
    assert m["clip_frac"].item() == pytest.approx(2 / 5)  # the two 1.5s; no lower bound
    logp, old, adv, mask = _case()
    loss, m = rl.cispo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)  # 0.5 -> 0.8 too
    loss.backward()
    assert logp.grad[1, 0].item() == pytest.approx(0.8 / 4, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(3 / 5)


@pytest.mark.parametrize("loss_fn", [rl.grpo_loss, rl.cispo_loss])
def test_losses_ignore_whatever_padding_holds(loss_fn):
    logp, old, adv, mask = _case()
    ref = torch.tensor(LOGP) + 0.1
    clean, m_clean = loss_fn(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    clean.backward()
    grad = logp.grad.clone()
    logp2, old2, _, _ = _case()
    old2, ref2 = old2.clone(), ref.clone()
    old2[1, 2], ref2[1, 2] = -1e4, 1e4  # exp() of these overflows: must never be computed into the loss
    dirty, m_dirty = loss_fn(logp2, old2, adv, mask, ref_logp=ref2, beta=0.1)
    dirty.backward()
    assert dirty.item() == pytest.approx(clean.item()) and torch.allclose(logp2.grad, grad)
    assert all(m_dirty[k].item() == pytest.approx(m_clean[k].item()) for k in m_clean)
    assert rl.approx_kl(logp2, old2, mask).item() == pytest.approx(rl.approx_kl(logp, old, mask).item())


def test_empty_mask_gives_zero_loss():
    logp, old, adv, _ = _case()
    loss, _ = rl.grpo_loss(logp, old, adv, torch.zeros(2, 3))
    assert loss.item() == 0
    assert set(rl.POLICY_LOSSES) == {"grpo", "cispo"}


# -----------------------------------------------------------------------------
# PPO pieces

def gae_reference(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's masked steps, in plain Python."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        steps = [t for t in range(T) if mask[b][t]]
        last = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_v = values[b][steps[i + 1]] if i + 1 < len(steps) else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    return adv


def test_gae_matches_reference_loop():
    torch.manual_seed(0)
    B, T = 5, 9
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = (torch.rand(B, T) > 0.3).float()  # gaps: padding and tool-response tokens
    mask[0] = 1
    mask[1] = 0  # an empty row
    mask[2, 6:] = 0  # a right-padded row
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)]:
        adv, ret = rl.gae(rewards, values, mask, gamma, lam)
        want = torch.tensor(gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam))
        assert torch.allclose(adv, want, atol=1e-5)
        assert torch.allclose(ret, (want + values) * mask, atol=1e-5)


def test_gae_outcome_reward_lam1_gamma1_is_reward_minus_value():
    values = torch.tensor([[0.5, 0.2, 0.1, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    tok = rl.last_token_rewards(torch.tensor([2.0]), mask)
    assert tok.tolist() == [[0.0, 0.0, 2.0, 0.0]]
    adv, ret = rl.gae(tok, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1.5, 1.8, 1.9, 0.0])  # Monte-Carlo return 2 minus V
    assert ret[0].tolist() == pytest.approx([2.0, 2.0, 2.0, 0.0])


def test_last_token_rewards_rows():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    got = rl.last_token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert got.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]]


def test_value_loss_hand_computed():
    v = torch.tensor([[1.0, 2.0]], requires_grad=True)
    old, ret, mask = torch.tensor([[0.5, 2.0]]), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2)
    loss = rl.value_loss(v, old, ret, mask, clip=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped branch: no gradient); token 1: (2-1)^2 = 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    loss.backward()
    assert v.grad[0].tolist() == pytest.approx([0.0, 0.5 * 2 * (2.0 - 1.0) / 2])
    assert rl.value_loss(v, old, ret, mask, clip=None).item() == pytest.approx(0.5 * (1 + 1) / 2)


def test_approx_kl_and_early_stop():
    logp, old, _, mask = _case()
    kl = rl.approx_kl(logp, old, mask)
    want = sum(r - 1 - math.log(r) for r in [1.5, 1.0, 0.9, 0.5, 1.5]) / 5  # k3 with samples from old
    assert kl.item() == pytest.approx(want, abs=1e-6) and not kl.requires_grad
    assert rl.approx_kl(old, old, mask).item() == 0
    assert rl.kl_early_stop(torch.tensor(0.016), 0.01) and not rl.kl_early_stop(0.014, 0.01)
    assert not rl.kl_early_stop(100.0, None)


# -----------------------------------------------------------------------------
# rewards

P = [{"role": "user", "content": "What is 6 × 7?"}]


def test_reward_length():
    assert rl.reward_length(P, "x" * 20, {}) == 0.5 and rl.reward_length(P, "  short  ", {}) == -0.5
    assert rl.reward_length(P, "x" * 801, {}) == -0.5
    assert rl.reward_length(P, "42", {}, lo=1, hi=5) == 0.5


def test_reward_think():
    think = "let me compute six times seven"  # 30 characters
    assert rl.reward_think(P, "42", {}) == 0.0
    assert rl.reward_think(P, f"<think>{think}</think>42", {}) == 1.0
    assert rl.reward_think(P, "<think>hm</think>42", {}) == 0.0  # closed, but too short
    assert rl.reward_think(P, f"<think>{think}</think>4</think>2", {}) == 0.0  # too many closings
    assert rl.reward_think(P, "<think>hm</think></think>", {}) == -1.0


def test_reward_repetition():
    assert rl.reward_repetition(P, "The answer is 42.", {}) == 0.0
    assert rl.repetition_penalty("a b c a b c a b c") == pytest.approx(0.5)  # 4 of 7 trigrams repeat: capped
    assert rl.repetition_penalty("one two three four one two three five six seven") == pytest.approx(0.5 * 2 * 1 / 8)
    assert rl.reward_repetition(P, "好好学习好好学习好好学习", {}) < 0  # single CJK characters are tokens
    assert rl.reward_repetition(P, "<think>a b c a b c a b c</think>The answer is 42.", {}) == 0.0  # answer only


@pytest.mark.parametrize("text", ["答案：42", "答案是42。", "\\boxed{42}", "The answer is 42.", "Answer: 42",
                                  "6 × 7 = 42", "**Answer:** 42", "<think>6*7 is 41? no</think>答案：４２",
                                  "the answer is \\boxed{42.0}"])
def test_reward_exact_accepts_answer_formats(text):
    assert rl.reward_exact(P, text, {"answer": "42"}) == 1.0


@pytest.mark.parametrize("text", ["答案：41", "The answer is 4.2", "42 is close, the answer is 43.", "",
                                  "<think>the answer is 42</think>I do not know", "\\boxed{41} (not 42)"])
def test_reward_exact_refuses_wrong_answers(text):
    assert rl.reward_exact(P, text, {"answer": "42"}) == 0.0


def test_reward_exact_numbers_and_strings():
    assert rl.reward_exact(P, "The answer is 9,716.", {"answer": "9716"}) == 1.0
    assert rl.reward_exact(P, "答案：-3", {"answer": "-3"}) == 1.0
    assert rl.reward_exact(P, "The capital of France is Paris.", {"answer": "Paris"}) == 1.0
    assert rl.reward_exact(P, "答案：巴黎", {"answer": "巴黎"}) == 1.0
    assert rl.reward_exact(P, "法国的首都是巴黎。", {"answer": "巴黎"}) == 1.0
    assert rl.reward_exact(P, "The answer is Fe.", {"answer": "Fe"}) == 1.0
    assert rl.reward_exact(P, "The answer is Xparis.", {"answer": "Paris"}) == 0.0
    assert rl.reward_exact(P, "The answer is Lyon.", {"answer": "Paris"}) == 0.0
    assert rl.reward_exact(P, "42", {}) == 0.0  # no reference


def test_reward_tool_calls():
    ok = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
    assert rl.reward_tool_calls(P, "The answer is 42.", {}) == 0.0
    assert rl.reward_tool_calls(P, "The answer is 42.", {"gt": ["42"]}) == -1.0  # a call was due
    assert rl.reward_tool_calls(P, ok, {}) == 1.0
    assert rl.reward_tool_calls(P, ok + "\n" + ok, {}) == 1.0
    bad = ['<tool_call>{"name": "shell", "arguments": {"cmd": "ls"}}</tool_call>',  # unknown tool
           '<tool_call>{"name": "calculator", "arguments": "6*7"}</tool_call>',  # arguments not an object
           '<tool_call>{"name": "calculator", "arguments": {"expr": "6*7"}}</tool_call>',  # wrong argument
           '<tool_call>{"name": "calculator", "arguments": {"expression": 42}}</tool_call>',  # wrong type
           "<tool_call>calculator(6*7)</tool_call>",  # not JSON
           '<tool_call>["calculator"]</tool_call>']
    for b in bad:
        assert rl.reward_tool_calls(P, b, {}) == -1.0, b
    assert rl.reward_tool_calls(P, ok + bad[0], {}) == 0.0  # one good, one bad
    assert rl.reward_tool_calls(P, ok + "<tool_call>", {}) == -1.0  # unbalanced tags
    # the record's own tools decide what is known
    record = {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}]}
    assert rl.reward_tool_calls(P, ok, record) == -1.0
    assert rl.reward_tool_calls(P, '<tool_call>{"name": "lookup", "arguments": {"key": "Iron"}}</tool_call>',
                                record) == 1.0
    record["tools"] = json.dumps(record["tools"])  # MiniMind stores them as a JSON string too
    assert rl.reward_tool_calls(P, ok, record) == -1.0


def test_parse_reward_specs_builtins_weights_kwargs():
    specs = rl.parse_reward_specs("exact:1.0 length[lo=1,hi=5]:0.1 think repetition:-0.5")
    assert [(n, w) for n, w, _ in specs] == [("exact", 1.0), ("length", 0.1), ("think", 1.0), ("repetition", -0.5)]
    assert specs[1][2](P, "42", {}) == 0.5  # the window from the spec
    for bad in ["nosuch:1.0", "length[lo]:1", "mathx:fn", "rl:NO_SUCH_FUNCTION", "rl:MAX_EXPR_LEN"]:
        with pytest.raises(ValueError):
            rl.parse_reward_specs(bad)


def test_parse_reward_specs_module_function(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "def myfn(prompt, completion, record):\n    return float(len(completion))\n"
        "def scaled(prompt, completion, record, k=1):\n    return k * 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = rl.parse_reward_specs("myrewards:myfn myrewards:myfn:0.5 myrewards:scaled[k=3]:2")
    assert [(n, w) for n, w, _ in specs] == [("myrewards:myfn", 1.0), ("myrewards:myfn", 0.5),
                                             ("myrewards:scaled", 2.0)]
    assert specs[0][2](P, "abc", {}) == 3.0 and specs[2][2](P, "", {}) == 3.0


def test_compute_rewards_weights_and_groups():
    specs = rl.parse_reward_specs("exact:1.0 length[lo=1,hi=10]:0.5")
    prompts = [P, [{"role": "user", "content": "2+2?"}]]
    records = [{"answer": "42"}, {"answer": "4"}]
    completions = ["答案：42", "答案：41", "The answer is 4.", "x" * 20]  # G = 2
    total, parts = rl.compute_rewards(specs, prompts, completions, records, group_size=2)
    assert parts["exact"].tolist() == [1, 0, 1, 0]
    assert parts["length"].tolist() == [0.5, 0.5, -0.5, -0.5]
    assert total.tolist() == pytest.approx([1.25, 0.25, 0.75, -0.25])


# -----------------------------------------------------------------------------
# tool sandbox

@pytest.mark.parametrize("expr,want", [("1 + 2 * 3", "7"), ("(3 + 4) * 12", "84"), ("7 / 2", "3.5"),
                                       ("2 ** 10", "1024"), ("2^10", "1024"), ("10 // 3", "3"), ("-5 % 3", "1"),
                                       ("-(2 + 3)", "-5"), ("0.1 + 0.2", "0.3"), ("3×4÷2", "6"), ("（1+2）*3", "9"), ("6 / 2", "3")])
def test_calculator_arithmetic(expr, want):
    assert rl.calculator(expr) == want


@pytest.mark.parametrize("expr", ["__import__('os').system('echo hi')", "().__class__.__bases__", "x + 1", "lambda: 1",
                                  "open('/etc/passwd')", "[1, 2]", "'a' * 3", "True + 1", "1 if 1 else 2",
                                  "(x := 3)", "9 ** 9 ** 9", "2 ** 101", "10 ** 99 * 10 ** 99", "1e999", "1 / 0",
                                  "(-8) ** (1 / 3)", "1 +", "", "1" * 201, "(" * 100 + "1" + ")" * 100,
                                  "exec('1')", "eval('1')", "1; import os", "a.b", "f'{1}'", "1 < 2", "~1", "1 & 3"])
def test_calculator_refuses(expr):
    with pytest.raises(rl.ToolError):
        rl.calculator(expr)
    out = json.loads(rl.run_tool_call(json.dumps({"name": "calculator", "arguments": {"expression": expr}})))
    assert set(out) == {"error"} and out["error"]


def test_calculator_never_evaluates(monkeypatch):
    """Refusing is not enough: the calculator must never reach eval/exec, nor compile to code
    (ast.parse compiles to a syntax tree only: flag PyCF_ONLY_AST)."""
    import builtins
    real_compile, called = builtins.compile, []
    def trap(*a, **k):
        called.append(a)
        raise AssertionError("eval/exec called")
    def ast_only(source, filename, mode, flags=0, *a, **k):
        if not flags & ast.PyCF_ONLY_AST:
            called.append(source)
        return real_compile(source, filename, mode, flags, *a, **k)
    monkeypatch.setattr(builtins, "eval", trap)
    monkeypatch.setattr(builtins, "exec", trap)
    monkeypatch.setattr(builtins, "compile", ast_only)
    results = [rl.calculator("(1 + 2) * 3")]
    for expr in ["__import__('os')", "().__class__", "lambda: 1"]:
        try:
            rl.calculator(expr)
        except rl.ToolError:
            results.append("refused")
    monkeypatch.undo()
    assert results == ["9", "refused", "refused", "refused"] and not called


@pytest.mark.parametrize("path", sorted((ROOT / "rl").glob("*.py")), ids=lambda p: p.name)
def test_rl_source_has_no_eval_exec_or_script_imports(path):
    tree = ast.parse(path.read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"eval", "exec", "compile", "__import__"}
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"train", "sample", "serve", "prepare", "export", "bench"}


def test_rl_modules_import_each_other_without_cycles():
    """rl/'s modules form a DAG with answers and tools at the bottom; prepare and data need only rl.tasks."""
    deps = {}
    for path in (ROOT / "rl").glob("*.py"):
        tree = ast.parse(path.read_text())
        deps[path.stem] = {n.module.split(".")[1] for n in ast.walk(tree)
                           if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("rl.")}
    assert deps["answers"] == set() and deps["tools"] == {"answers"} and deps["policy"] == set()
    order = []
    while len(order) < len(deps):  # Kahn: peel the modules whose imports are all placed
        ready = sorted(m for m, d in deps.items() if m not in order and d <= set(order))
        assert ready, f"cycle among {sorted(set(deps) - set(order))}"
        order += ready


def test_unit_convert_and_lookup():
    assert rl.unit_convert(3, "km", "m") == "3000"
    assert rl.unit_convert(2, "小时", "分钟") == "120"
    assert rl.unit_convert("100", "celsius", "F") == "212"
    assert rl.unit_convert(0, "K", "°C") == "-273.15"
    assert rl.unit_convert(1, "mile", "km") == "1.609344"
    assert rl.unit_convert(3, "斤", "kg") == "1.5"
    for args in [(1, "kg", "m"), (1, "furlong", "m"), ("abc", "m", "km"), (float("nan"), "m", "km"), (True, "m", "km")]:
        with pytest.raises(rl.ToolError):
            rl.unit_convert(*args)
    assert rl.lookup("France") == "Paris" and rl.lookup("法国") == "巴黎" and rl.lookup(" iron ") == "Fe"
    with pytest.raises(rl.ToolError):
        rl.lookup("Atlantis")


def test_run_tool_call_answers_errors_not_exceptions():
    call = lambda name, **a: json.loads(rl.run_tool_call(json.dumps({"name": name, "arguments": a})))
    assert call("calculator", expression="6*7") == {"result": "42"}
    assert call("unit_convert", value=3, from_unit="day", to_unit="s") == {"result": "259200"}
    assert call("lookup", key="Japan") == {"result": "Tokyo"}
    assert "unknown tool" in call("shell", cmd="rm -rf /")["error"]
    assert "missing" in call("unit_convert", value=3)["error"]
    assert "unknown argument" in call("lookup", key="Japan", extra=1)["error"]
    assert "must be a number" in call("unit_convert", value="3", from_unit="m", to_unit="km")["error"]
    for garbage in ["", "{", "null", "[]", '{"name": 1}', '{"arguments": {}}', "x" * 10000]:
        assert "error" in json.loads(rl.run_tool_call(garbage))
    # the tags may be included; a tool that crashes is reported, not raised
    assert json.loads(rl.run_tool_call('<tool_call>{"name": "lookup", "arguments": {"key": "Egypt"}}</tool_call>')) \
        == {"result": "Cairo"}
    boom = rl.SandboxTool("boom", "crashes", _params([]), lambda: 1 / 0)
    assert "failed" in json.loads(rl.run_tool_call('{"name": "boom", "arguments": {}}', {"boom": boom}))["error"]


def test_tool_response_message():
    text = ('<think>I need the tool</think>\n<tool_call>{"name": "calculator", "arguments": {"expression": "347*28"}}'
            '</tool_call>\n<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    msg = rl.tool_response_message(text)
    assert msg["role"] == "user"
    blocks = msg["content"].split("</tool_response>")[:-1]
    assert len(blocks) == 2 and '"9716"' in blocks[0] and "unknown tool" in blocks[1]
    assert msg["content"].startswith("<tool_response>\n")
    assert rl.tool_response_message("The answer is 9716.") is None
    assert rl.tool_response_message("<think><tool_call>{}</tool_call></think>done") is None  # calls in thought only


# -----------------------------------------------------------------------------
# tasks

def test_make_task_deterministic_and_well_formed():
    a = [rl.make_task(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng1, rng2 = random.Random(3), random.Random(3)
    assert [rl.make_task(rng1) for _ in range(50)] == [rl.make_task(rng2) for _ in range(50)]
    rng = random.Random(0)
    kinds = set()
    for _ in range(400):
        rec = rl.make_task(rng)
        kinds.add(rec["kind"])
        msgs = rl.prompt_messages(rec)
        assert msgs[-1]["role"] == "user" and rec["conversations"][-1]["role"] == "assistant"
        assert isinstance(rec["answer"], str) and rec["answer"]
        # the reference turn is in the format the exact reward reads
        assert rl.reward_exact(msgs, rec["conversations"][-1]["content"], rec) == 1.0
        if rec["kind"] in rl.TOOL_TASKS:
            assert msgs[0]["role"] == "system" and "<tool_call>" in msgs[0]["content"]
            assert rec["gt"] == [rec["answer"]] and {t["function"]["name"] for t in rec["tools"]} == set(rl.TOOLS)
    assert kinds == set(rl.TASKS)
    with pytest.raises(ValueError):
        rl.make_task(rng, kinds=["nope"])


def test_tool_tasks_are_solvable_with_the_tools():
    rng = random.Random(1)
    for _ in range(60):
        rec = rl.make_task(rng, kinds=sorted(rl.TOOL_TASKS))
        key = json.loads(rec["key"])
        if key[0] == "calc_tool":
            call = {"name": "calculator", "arguments": {"expression": key[1]}}
        elif key[0] == "unit_tool":
            _, _, _, _, a, b, _ = _TOOL_UNITS[key[1]]
            call = {"name": "unit_convert", "arguments": {"value": key[2], "from_unit": a, "to_unit": b}}
        else:
            call = {"name": "lookup", "arguments": {"key": key[1]}}
        result = json.loads(rl.run_tool_call(json.dumps(call)))["result"]
        if key[0] == "capital" and rec["lang"] == "zh":
            result = next(c[3] for c in rl.CAPITALS if c[0] == key[1])
        assert rl.answers_match(result, rec["answer"]), (rec, result)


def test_demonstrations_solve_every_task_with_its_tool(tmp_path):
    rng = random.Random(2)
    for _ in range(80):
        rec = rl.make_task(rng, compact_tools=True)
        demo = rl.demonstration(rec)
        assert demo[-1] == rec["conversations"][-1]  # ends with the reference answer
        if rec["kind"] not in rl.TOOL_TASKS:
            assert demo == rec["conversations"]
            continue
        call_turn, response, answer = demo[-3:]
        assert call_turn["role"] == "assistant" and rl.reward_tool_calls(None, call_turn["content"], rec) == 1.0
        assert response == rl.tool_response_message(call_turn["content"])
        result = json.loads(re.search(r"<tool_response>\n(.*)\n</tool_response>", response["content"], re.S).group(1))["result"]
        assert rl.answers_match(result, rec["answer"]), (rec, result)
        assert "<tools>" in demo[0]["content"] and "{" not in demo[0]["content"].split("<tools>")[1].split("</tools>")[0]


def test_compact_tool_listing_is_short_and_names_every_argument():
    schemas = [t.schema() for t in rl.TOOLS.values()]
    full, compact = rl.tools_system_prompt(schemas), rl.tools_system_prompt(schemas, compact=True)
    assert len(compact) < 0.6 * len(full)
    assert "unit_convert(value: number, from_unit: string, to_unit: string)" in compact
    assert "<tool_call>" in compact and "The answer is X." in compact


def test_make_task_languages():
    rng = random.Random(0)
    zh = [rl.make_task(rng, lang="zh", kinds=["arith", "story", "count", "unit"]) for _ in range(30)]
    en = [rl.make_task(rng, lang="en", kinds=["arith", "story", "count", "unit"]) for _ in range(30)]
    has_cjk = lambda s: any("\u4e00" <= ch <= "\u9fff" for ch in s)
    assert all(has_cjk(r["conversations"][0]["content"]) for r in zh)
    assert not any(has_cjk(r["conversations"][0]["content"]) for r in en)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_write_task_deterministic_and_disjoint(tmp_path):
    a = rl.write_task(tmp_path / "a" / "train.jsonl", tmp_path / "a" / "val.jsonl", 300, 40, seed=5)
    b = rl.write_task(tmp_path / "b" / "train.jsonl", tmp_path / "b" / "val.jsonl", 300, 40, seed=5)
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    c = rl.write_task(tmp_path / "c" / "train.jsonl", tmp_path / "c" / "val.jsonl", 300, 40, seed=6)
    assert c[0].read_bytes() != a[0].read_bytes()
    train, val = read_jsonl(a[0]), read_jsonl(a[1])
    assert len(train) == 300 and len(val) == 40
    # different problems: no key (wording- and language-independent) in both, whatever the seed
    train_keys = {r["key"] for r in train} | {r["key"] for r in read_jsonl(c[0])}
    assert not train_keys & ({r["key"] for r in val} | {r["key"] for r in read_jsonl(c[1])})
    assert not {r["conversations"][-2]["content"] for r in train} & {r["conversations"][-2]["content"] for r in val}
    assert len({(r["key"], r["lang"]) for r in train}) == 300  # no repeats within a split
    with pytest.raises(ValueError):  # a problem space too small for the request
        rl.write_task(tmp_path / "t.jsonl", tmp_path / "v.jsonl", 500, 10, seed=0, kinds=["lookup_tool"])


# -----------------------------------------------------------------------------
# reward model

@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A randomly initialised LlamaForSequenceClassification and a small BPE tokenizer, saved as a
    transformers directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
    out = tmp_path_factory.mktemp("rm") / "rm"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["What is 6 × 7? The answer is 42.", "答案：42", "法国的首都是巴黎。", "user assistant system"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
                      max_position_embeddings=512)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.mul_(50)  # spread the scores so that different inputs differ clearly
    model.save_pretrained(out)
    return out, model.eval(), fast


def test_reward_model_scores_deterministically(tiny_rm):
    path, model, tok = tiny_rm
    rm = rl.RewardModel(path, clip=None)
    a, b = rm(P, "The answer is 42.", {}), rm(P, "答案：41", {})
    assert rm(P, "The answer is 42.", {}) == a and rl.RewardModel(path, clip=None).score(P, "The answer is 42.") == a
    assert a != b
    # the logit of the project's chat rendering (no chat template in the tokenizer: tokenizer.CHAT_TEMPLATE)
    text = render_chat(P + [{"role": "assistant", "content": "The answer is 42."}])
    assert rm.render(P, "The answer is 42.") == text
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits[0, 0].item() == pytest.approx(a, abs=1e-5)
    clipped = rl.RewardModel(path, clip=0.01)
    assert abs(clipped(P, "The answer is 42.", {})) <= 0.01


def test_reward_model_as_a_reward_spec(tiny_rm):
    path = tiny_rm[0]
    specs = rl.parse_reward_specs(f"exact:1 rm[path={path},clip=none]:0.5", registry={"rm": rl.RewardModel})
    total, parts = rl.compute_rewards(specs, [P], ["The answer is 42."], [{"answer": "42"}])
    assert total.item() == pytest.approx(1 + 0.5 * rl.RewardModel(path, clip=None)(P, "The answer is 42.", {}),
                                         abs=1e-5)


def test_token_entropy_is_minus_sum_p_log_p_whatever_the_chunk():
    torch.manual_seed(0)
    logits, mask = torch.randn(7, 5, 11), (torch.rand(7, 5) > 0.3).float()
    p = torch.softmax(logits.double(), -1)
    expected = (-(p * p.log()).sum(-1) * mask).float()
    for chunk in (1, 60, 2 ** 24):  # one row at a time, a row of 55 values plus change, all at once
        assert torch.allclose(rl.token_entropy(logits, mask, chunk=chunk), expected, atol=1e-6)
    assert rl.token_entropy(torch.zeros(2, 3, 4)).allclose(torch.full((2, 3), math.log(4)))

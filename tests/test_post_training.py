"""Post-training modes of train.py: grpo (GRPO, CISPO, agentic --tools), ppo, distill.

In process: rollouts are a pure function of the seed and pad rows exactly; the tool sandbox refuses
code inside an agentic rollout and its responses are never trained on; a GRPO and a CISPO step of the
objective move probability toward the high-reward episodes; PPO's GAE is wired to the rollout (reward
on the last model token, the value head's values, whitening); the distillation loss against a hand
computation; the prompt reader. Through train.py: prepare.py rl-task -> grpo / ppo / --tools / distill
runs, resume equal to an uninterrupted run, two processes equal to one with accumulation.

    OMP_NUM_THREADS=1 python -m pytest tests/test_post_training.py -q
"""
import builtins
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import checkpoint
import rl
import train
from checkpoint import load_checkpoint, resolve_checkpoint
from conftest import ONE_THREAD, ROOT, loss_curve, read_log, run, run_single_and_ddp
from data import DataError, PromptData, SFTData
from losses import Distill, DistillConfig, PolicyGradient, distill_kl
from minimind import MiniMind, ModelConfig
from tokenizer import EMPTY_THINK, Tokenizer


def toy_reward(prompt, completion: str, record=None) -> float:
    """A reward that varies between samples of a random model: the share of ASCII characters in its text."""
    return sum(c.isascii() for c in completion) / max(1, len(completion))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def rl_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "add"
    run(["prepare.py", "rl-task", "--out", out, "--kinds", "add", "--lang", "en", "--n-train", "60", "--n-val", "6"])
    return out


def small_model(tok, seed=0):
    torch.manual_seed(seed)
    model = MiniMind(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128))
    with torch.no_grad():
        model.norm.weight.mul_(4)  # sharper than the usual init: samples differ, some repeat
    return model


def prompts_of(tok, rl_dir, n):
    return [tok.encode_chat(rl.rollout_messages(json.loads(line)))
            for line in open(rl_dir / "train.jsonl", encoding="utf-8").readlines()[:n]]


# -----------------------------------------------------------------------------
# rollouts

def test_rollouts_are_a_pure_function_of_the_seed(tok, rl_dir, one_thread):
    model = small_model(tok)
    prompts = prompts_of(tok, rl_dir, 3) * 2
    a = rl.rollout(model, tok, prompts, 10, generator=torch.Generator().manual_seed(7))
    b = rl.rollout(model, tok, prompts, 10, generator=torch.Generator().manual_seed(7))
    c = rl.rollout(model, tok, prompts, 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.completion, b.completion) and a.texts == b.texts and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.completion, c.completion)
    assert model.training  # restored after sampling in eval mode
    # the mask: everything up to and including each episode's eos, nothing after
    for row, m in zip(a.completion.tolist(), a.mask.tolist()):
        n = row.index(tok.eos_id) + 1 if tok.eos_id in row else len(row)
        assert m == [1.0] * n + [0.0] * (len(row) - n)


def test_left_padded_rollout_equals_each_prompt_alone(tok, rl_dir, one_thread):
    model = small_model(tok, seed=1).eval()
    prompts = prompts_of(tok, rl_dir, 4)
    assert len({len(p) for p in prompts}) > 1, "the prompts should differ in length"
    together = rl.rollout(model, tok, prompts, 8, temperature=0)
    for i, p in enumerate(prompts):
        alone = rl.rollout(model, tok, [p], 8, temperature=0)
        n = int(alone.mask.sum())
        assert together.completion[i, :n].tolist() == alone.completion[0, :n].tolist()
        assert together.texts[i] == alone.texts[0]


class ScriptedModel(nn.Module):
    """Writes the given replies, one per turn, in every row; records the contexts it was given."""

    def __init__(self, tok, replies):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.replies = [tok.encode(r) + [tok.eos_id] for r in replies]
        self.contexts = []

    def generate_stream(self, idx, max_new_tokens, eos_id=None, pad=None, **kw):
        self.contexts.append([row[p:] for row, p in zip(idx.tolist(), pad.tolist())])
        reply = self.replies[len(self.contexts) - 1]
        for t in range(min(max_new_tokens, len(reply))):
            yield torch.full((idx.size(0),), reply[t])


CODE_CALL = ('<tool_call>{"name": "calculator", "arguments": {"expression": '
             '"__import__(\'os\').system(\'touch /tmp/pwned\')"}}</tool_call>')


def test_agentic_rollout_refuses_code_and_masks_tool_responses(tok, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("eval/exec called")
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    replies = [CODE_CALL, '<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 7"}}</tool_call>',
               "The answer is 42."]
    model = ScriptedModel(tok, replies)
    prompt = tok.encode_chat([{"role": "user", "content": "What is 6 * 7?"}])
    ro = rl.rollout(model, tok, [prompt, prompt], 200, tools=rl.select_tools("calculator"), max_turns=3)
    assert ro.texts[0] == ro.texts[1] == "\n".join(replies)
    assert ro.tool_calls.tolist() == [2.0, 2.0]
    row, mask = ro.completion[0].tolist(), ro.mask[0].tolist()
    written = [t for t, m in zip(row, mask) if m == 1]
    assert written == sum(model.replies, [])  # the model's own tokens, eos included, and nothing else
    fed_back = tok.decode([t for t, m in zip(row, mask) if m == 0 and t != tok.pad_id])
    first, second = fed_back.split("<tool_response>")[1:3]
    assert '"error"' in first and "unsupported expression" in first and "pwned" not in first
    assert '{"result": "42"}' in second
    # the next turn's prompt is the conversation so far, tool responses rendered as a user turn
    assert model.contexts[1][0] == prompt + row[:len(model.contexts[1][0]) - len(prompt)]
    # (the generation prompt of MiniMind-3's template: thinking off, an empty think block)
    turn_start = "</tool_response><|im_end|>\n<|im_start|>assistant\n" + EMPTY_THINK
    assert tok.decode(model.contexts[1][0]).endswith(turn_start)
    assert rl.reward_exact(None, ro.texts[0], {"answer": "42"}) == 1.0  # rewards read the model's turns
    with pytest.raises(ValueError, match="nope"):
        rl.select_tools("calculator,nope")


def test_a_turn_cut_at_max_new_tokens_ends_the_episode(tok):
    model = ScriptedModel(tok, [CODE_CALL, "The answer is 42."])
    prompt = tok.encode_chat([{"role": "user", "content": "What is 6 * 7?"}])
    ro = rl.rollout(model, tok, [prompt], 5, tools=rl.select_tools("all"), max_turns=3)
    assert len(model.contexts) == 1 and ro.mask.sum() == 5 and bool((ro.mask == 1).all())


# -----------------------------------------------------------------------------
# the objective: grpo, cispo, ppo

def rl_config(tok_dir, **kw):
    """The objective's config as train.py fills it from its flags (their defaults, then these)."""
    args = train.build_parser().parse_args(["--mode", kw.pop("mode", "grpo")])
    args.tokenizer_dir, args.seq_len, args.max_new_tokens, args.num_generations = str(tok_dir), 128, 8, 4
    args.beta, args.ppo_epochs, args.ppo_minibatches = 0.04, 1, 1
    args.reward = "test_post_training:toy_reward"
    for k, v in kw.items():
        setattr(args, k, v)
    return train.policy_gradient_config(args)


def episode_logp(model, ro):
    """Mean log-probability of each episode's model tokens."""
    with torch.no_grad():
        logp = rl.completion_logprobs(model, ro.prompt, ro.completion, ro.mask, ro.pad)
    return (logp * ro.mask).sum(1) / ro.mask.sum(1)


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_a_policy_step_moves_probability_toward_the_better_episodes(tok, tokenizer_dir, rl_dir, loss_type, one_thread):
    model = small_model(tok, seed=2)
    objective = PolicyGradient(model, rl_config(tokenizer_dir, loss_type=loss_type))
    batch = objective.prepare(PromptData(rl_dir, 128, seed=0).batch("train", 1, 0, 3, "cpu"))
    loss, metrics = objective(model, batch)
    ro = batch["episodes"]["ro"]
    adv = batch["episodes"]["adv"]
    assert adv.abs().sum() > 0 and metrics["mixed_groups"] > 0
    assert metrics["ratio"].item() == pytest.approx(1) and metrics["kl"].item() == pytest.approx(0, abs=1e-6)
    before = episode_logp(model, ro)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    gain = episode_logp(model, ro) - before
    assert (adv * gain).sum() > 0  # the update favours the episodes with positive advantages
    assert gain[adv > 0].mean() > gain[adv < 0].mean()
    # the same prepared batch again: its rollout is reused, not sampled anew
    again, m2 = objective(model, batch)
    assert m2["reward"] == metrics["reward"] and m2["kl"] > 0


def test_on_policy_grpo_and_cispo_have_the_same_gradient(tok, tokenizer_dir, rl_dir, one_thread):
    """One update per rollout: ratio 1, nothing clipped, both gradients are -A * grad log pi."""
    grads = []
    for loss_type in ("grpo", "cispo"):
        model = small_model(tok, seed=4)
        objective = PolicyGradient(model, rl_config(tokenizer_dir, loss_type=loss_type))
        loss, _ = objective(model, objective.prepare(PromptData(rl_dir, 128, seed=0).batch("train", 1, 0, 3, "cpu")))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)


def even_answers_score_zero(prompt, completion: str, record=None) -> float:
    """toy_reward, except that every episode of a prompt whose answer is even scores 0: uniform groups."""
    return 0.0 if int(record["answer"]) % 2 == 0 else toy_reward(prompt, completion)


def constant_reward(prompt, completion: str, record=None) -> float:
    return 1.0


def uniform_groups(batch, G):
    return int((batch["episodes"]["adv"].view(-1, G).abs().sum(1) == 0).sum())


def test_dynamic_sampling_equals_plain_grpo_when_no_group_is_uniform(tok, tokenizer_dir, rl_dir, one_thread):
    """Every group differs (toy_reward on a random model): nothing is resampled, and the loss and the
    gradient are plain GRPO's, bit for bit."""
    results = []
    for rounds in (0, 2):
        model = small_model(tok, seed=4)
        objective = PolicyGradient(model, rl_config(tokenizer_dir, dynamic_sampling=rounds))
        batch = objective.prepare(PromptData(rl_dir, 128, seed=0, spares=6).batch("train", 1, 0, 3, "cpu"))
        loss, metrics = objective(model, batch)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]), metrics))
    (loss0, grad0, m0), (loss2, grad2, m2) = results
    assert m0["mixed_groups"] == 1 and m2["resampled"] == 0 and m2["kept_mixed"] == 1
    assert torch.equal(loss0, loss2) and torch.equal(grad0, grad2) and grad0.abs().sum() > 0


def test_dynamic_sampling_replaces_uniform_groups(tok, tokenizer_dir, rl_dir, one_thread):
    G, P = 4, 6
    data = PromptData(rl_dir, 128, seed=0, spares=2 * P)
    raw = data.batch("train", 1, 0, P, "cpu")
    assert len(raw["spares"]) == 2 * P and not {r["key"] for r in raw["spares"]} & {r["key"] for r in raw["records"]}
    reward = {"reward": "test_post_training:even_answers_score_zero", "num_generations": G}
    plain = PolicyGradient(small_model(tok, seed=4), rl_config(tokenizer_dir, dynamic_sampling=0, **reward))
    before = uniform_groups(plain.prepare(raw), G)
    assert before > 0  # the batch has prompts with even answers
    model = small_model(tok, seed=4)
    objective = PolicyGradient(model, rl_config(tokenizer_dir, dynamic_sampling=2, **reward))
    batch = objective.prepare(data.batch("train", 1, 0, P, "cpu"))
    m = batch["episodes"]["metrics"]
    assert uniform_groups(batch, G) < before and m["kept_mixed"] > m["mixed_groups"] and m["resampled"] >= 1
    ro = batch["episodes"]["ro"]
    assert len(ro.texts) == ro.prompt.size(0) == ro.completion.size(0) == P * G
    # each joined row scores as it did in its own rollout: episodes the model wrote, re-scored
    logp = rl.completion_logprobs(model, ro.prompt, ro.completion, ro.mask, ro.pad)
    expected = torch.tensor([toy_reward(None, t) if (logp[i] != 0).any() else 0 for i, t in enumerate(ro.texts)])
    assert expected.abs().sum() > 0
    loss, metrics = objective(model, batch)
    assert torch.isfinite(loss) and metrics["entropy"] > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dynamic_sampling_without_any_signal_keeps_the_loss_finite(tok, tokenizer_dir, rl_dir, one_thread):
    model = small_model(tok, seed=4)
    objective = PolicyGradient(model, rl_config(tokenizer_dir, dynamic_sampling=2,
                                                         reward="test_post_training:constant_reward"))
    batch = objective.prepare(PromptData(rl_dir, 128, seed=0, spares=6).batch("train", 1, 0, 3, "cpu"))
    loss, metrics = objective(model, batch)
    assert metrics["mixed_groups"] == 0 and metrics["kept_mixed"] == 0 and metrics["resampled"] == 2
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0, abs=1e-6)
    lines = [objective.advice({"mixed_groups": 0.0, "kept_mixed": 0.0}) for _ in range(12)]
    assert [bool(x) for x in lines] == [False] * 9 + [True] + [False] * 2  # after 10 logged steps, once
    assert "--num-generations (now 4)" in lines[9] and "--rollout-temperature" in lines[9]
    assert not any(PolicyGradient(model, rl_config(tokenizer_dir)).advice({"mixed_groups": 0.5}) for _ in range(12))


def test_the_rollout_temperature_never_reaches_evaluation(tok, tokenizer_dir, rl_dir, one_thread, monkeypatch):
    """Held-out episodes are greedy (--eval-temperature 0) whatever --rollout-temperature is; training
    episodes sample at the rollout temperature."""
    seen, real = [], rl.rollout
    monkeypatch.setattr(rl, "rollout", lambda *a, **kw: seen.append(kw["temperature"]) or real(*a, **kw))
    data, evals = PromptData(rl_dir, 128, seed=0), []
    for temperature in (0.7, 3.0):
        model = small_model(tok, seed=4)
        objective = PolicyGradient(model, rl_config(tokenizer_dir, rollout_temperature=temperature))
        objective.prepare(data.batch("train", 1, 0, 2, "cpu"))
        evals.append(objective.evaluate(model, data.batch("val", 0, 0, 3, "cpu")))
    assert seen == [0.7, 0.0, 3.0, 0.0]
    assert evals[0][0] == evals[1][0] and evals[0][1] == evals[1][1]


def test_ppo_gae_wiring(tok, tokenizer_dir, rl_dir, one_thread):
    model = small_model(tok, seed=3)
    objective = PolicyGradient(model, rl_config(tokenizer_dir, mode="ppo", gamma=0.9, lam=0.8, ppo_epochs=2,
                                                ppo_minibatches=3))
    assert objective.updates == 6 and isinstance(objective.module, nn.Linear)
    with torch.no_grad():  # a value head that says something, so that GAE uses the values
        objective.module.weight.normal_(0, 0.3)
    data = PromptData(rl_dir, 128, seed=0)
    batch = objective.prepare(data.batch("train", 1, 0, 3, "cpu"))
    loss, metrics = objective(model, {**batch, "update": 0})
    state = batch["episodes"]
    ro, mask = state["ro"], state["ro"].mask
    rewards = torch.tensor([toy_reward(None, t) for t in ro.texts])
    with torch.no_grad():
        _, h = rl.completion_logprobs(model, ro.prompt, ro.completion, mask, ro.pad, hidden=True)
        values = objective.module(h).squeeze(-1) * mask
    token_rewards = torch.zeros_like(mask)
    for b in range(len(ro.texts)):  # the outcome reward sits on the episode's last token, its eos
        token_rewards[b, int(mask[b].nonzero().max())] = rewards[b]
    adv, returns = rl.gae(token_rewards, values, mask, 0.9, 0.8)
    assert torch.allclose(state["old_values"], values, atol=1e-6)
    assert torch.allclose(state["returns"], returns, atol=1e-5)
    assert torch.allclose(state["adv"], rl.whiten(adv, mask), atol=1e-5)
    assert rl.masked_mean(state["adv"], mask).abs() < 1e-5  # whitened over the micro-batch
    # updates take disjoint minibatches that cover the episodes once per epoch, reshuffled per epoch
    rows = [objective.minibatch({**batch, "update": u}, len(ro.texts)).tolist() for u in range(6)]
    assert sorted(sum(rows[:3], [])) == sorted(sum(rows[3:], [])) == list(range(len(ro.texts)))
    assert rows[:3] != rows[3:]
    # the value head learns from the value loss (and only from it: the hidden states are detached)
    loss.backward()
    assert objective.module.weight.grad.abs().sum() > 0 and metrics["value_loss"] > 0
    assert not objective.stop(0.1) and objective.stop(0.2)  # 1.5 x --target-kl 0.1


def test_prompt_data_reads_a_directory_or_one_jsonl_file(rl_dir, tmp_path):
    meta = json.loads((rl_dir / "meta.json").read_text())
    assert meta["kind"] == "prompts" and meta["kinds"] == ["add"]
    sft = [json.loads(l) for l in (rl_dir / "sft.jsonl").read_text().splitlines()]
    train_records = [json.loads(l) for l in (rl_dir / "train.jsonl").read_text().splitlines()]
    assert [r["conversations"] for r in sft] == [r["conversations"] for r in train_records]  # solved: ready for SFT
    d = PromptData(rl_dir, 64, seed=3, micro_batches=2)
    assert len(d.splits["train"]) == 60 and len(d.splits["val"]) == 6
    a, b = d.batch("train", 2, 1, 4, "cpu"), PromptData(rl_dir, 64, seed=3, micro_batches=2).batch("train", 2, 1, 4, "cpu")
    assert a["records"] == b["records"] and a["seed"] == b["seed"]
    assert torch.equal(torch.rand(3, generator=a["generator"]), torch.rand(3, generator=b["generator"]))
    # one epoch of 60 prompts = 15 steps of 2 micro-batches of 2: every prompt once
    seen = [json.dumps(r) for s in range(1, 16) for i in range(2) for r in d.batch("train", s, i, 2, "cpu")["records"]]
    assert len(set(seen)) == 60
    # a single file (MiniMind's rlaif.jsonl): split by the rule, records without a key by their prompt
    lines = (rl_dir / "train.jsonl").read_text().splitlines() + (rl_dir / "val.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    for r in records[:30]:
        del r["key"]
    f = tmp_path / "rlaif.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    one = PromptData(f, 64, seed=0)
    assert len(one.splits["train"]) + len(one.splits["val"]) == 66 and one.splits["val"]
    f.write_text('{"conversations": [{"role": "assistant", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="rlaif.jsonl:1"):
        PromptData(f, 64, seed=0)


# -----------------------------------------------------------------------------
# distillation

def test_distill_loss_against_a_hand_computation(sft_dir, sft_ckpt, base_ckpt, tokenizer_dir):
    teacher, _, _ = load_checkpoint(sft_ckpt)
    student, _, _ = load_checkpoint(base_ckpt)
    student.train()
    loss_fn = Distill(student, DistillConfig(teacher=str(sft_ckpt), tokenizer_dir=str(tokenizer_dir), alpha=0.3,
                                             temperature=2.0))
    batch = SFTData(sft_dir, 128, seed=0).batch("train", 1, 0, 2, "cpu")
    loss, m = loss_fn(student, batch)
    with torch.no_grad():
        s_logits, _ = student(batch["idx"], pos=batch["pos"], doc=batch["doc"])
        t_logits, _ = teacher(batch["idx"], pos=batch["pos"], doc=batch["doc"])
    ce, kl, n = 0.0, 0.0, 0
    for b, t in (batch["targets"] >= 0).nonzero().tolist():
        y = batch["targets"][b, t].item()
        s, q = s_logits[b, t].double(), t_logits[b, t].double()
        ce += -(s.softmax(-1)[y]).log().item()
        p_t, p_s = (q / 2).softmax(-1), (s / 2).softmax(-1)
        kl += (p_t * (p_t.log() - p_s.log())).sum().item()
        n += 1
    assert m["ce"].item() == pytest.approx(ce / n, rel=1e-5)
    assert m["kl"].item() == pytest.approx(kl / n, rel=1e-4)
    assert loss.item() == pytest.approx(0.3 * ce / n + 0.7 * 4 * kl / n, rel=1e-4)
    assert distill_kl(t_logits, t_logits, batch["targets"] >= 0, 2.0).item() == pytest.approx(0, abs=1e-6)


def test_distill_refuses_a_teacher_with_another_tokenizer(sft_ckpt, tmp_path, tokenizer_dir):
    other = tmp_path / "other"
    shutil.copytree(resolve_checkpoint(sft_ckpt), other)
    tj = other / "tokenizer" / "tokenizer.json"
    tj.write_text(tj.read_text() + "\n")  # the same tokenizer, another file: another hash
    state = json.loads((other / "state.json").read_text())  # saved so: its state.json vouches for it
    state["files"] = {f: checkpoint.file_hash(other / f) for f in checkpoint.hashed_files(other)}
    (other / "state.json").write_text(json.dumps(state))
    student, _, _ = load_checkpoint(sft_ckpt)
    with pytest.raises(ValueError, match="another tokenizer"):
        Distill(student, DistillConfig(teacher=str(other), tokenizer_dir=str(tokenizer_dir), alpha=0.5, temperature=1.5))


# -----------------------------------------------------------------------------
# train.py

RL = ["--batch-size", "2", "--num-generations", "4", "--max-new-tokens", "8", "--eval-iters", "3",
      "--log-interval", "1", "--lr", "1e-3", "--reward", "exact length[lo=6,hi=14]:0.5"]  # length: a varied reward


def weights(out):
    return load_file(resolve_checkpoint(out) / "model.safetensors")


@pytest.mark.parametrize("mode", ["grpo", "ppo"])
def test_rl_resume_equals_an_uninterrupted_run(mode, sft_ckpt, rl_dir, tmp_path):
    """4 steps in one go == 2 steps, then --resume to 4 (constant lr: the schedule does not depend on
    --max-iters): the rollouts, rewards, losses, weights and (ppo) value head are the same."""
    common = ["--mode", mode, "--init-from", sft_ckpt, "--data", rl_dir, *RL, "--eval-interval", "2",
              "--save-interval", "2", "--warmup-iters", "0", "--min-lr-ratio", "1"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    run(["train.py", "--out", ref, *common, "--max-iters", "4"], env=ONE_THREAD)
    run(["train.py", "--out", out, *common, "--max-iters", "2"], env=ONE_THREAD)
    run(["train.py", "--out", out, "--resume", "--max-iters", "4"], env=ONE_THREAD)
    assert loss_curve(out) == loss_curve(ref)
    keys = ("reward", "reward_exact", "reward_length", "response_len", "kl", "val_reward")
    assert [[r.get(k) for k in keys] for r in read_log(out)] == [[r.get(k) for k in keys] for r in read_log(ref)]
    a, b = weights(out), weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = read_log(ref)
    assert any(r.get("kl", 0) > 0 for r in log)  # the reference is the start, not the resumed weights
    if mode == "ppo":
        va = torch.load(resolve_checkpoint(out) / "optim.pt", weights_only=True)["module"]
        vb = torch.load(resolve_checkpoint(ref) / "optim.pt", weights_only=True)["module"]
        assert all(torch.equal(va[k], vb[k]) for k in va) and vb["weight"].abs().sum() > 0
        train_log = [r for r in log if "loss" in r]
        assert all(1 <= r["updates"] <= 4 for r in train_log) and all("value_loss" in r for r in train_log)
    state = json.loads((resolve_checkpoint(out) / "state.json").read_text())
    assert state["kind"] == mode and state["args"]["init_from"] == str(sft_ckpt)
    # the checkpoint is a plain model: the value head stays in optim.pt
    model, _, _ = load_checkpoint(out)
    assert not hasattr(model, "value_head")


@pytest.mark.parametrize("mode", ["grpo", "ppo"])
def test_rl_two_processes_match_one(mode, sft_ckpt, rl_dir, tmp_path):
    """The same global batch (2 micro-batches of 2 prompts x 4 episodes): one process accumulates both,
    two processes one each. Rollouts are seeded by (seed, step, micro-batch): the same episodes."""
    common = ["--mode", mode, "--init-from", sft_ckpt, "--data", rl_dir, *RL, "--max-iters", "3",
              "--eval-interval", "3", "--save-interval", "3", "--batch-tokens", str(2 * 2 * 128)]
    single, multi = run_single_and_ddp(tmp_path, common, ("loss", "reward", "reward_length", "response_len",
                                                          "kl", "val_reward", "val_loss"), rel=1e-3)
    wa, wb = weights(single), weights(multi)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_agentic_grpo_and_cispo_run(sft_ckpt, tmp_path):
    data = tmp_path / "tools"
    run(["prepare.py", "rl-task", "--out", data, "--kinds", "calc_tool,lookup_tool", "--n-train", "20", "--n-val", "4"])
    out = tmp_path / "agent"
    run(["train.py", "--mode", "grpo", "--tools", "--loss-type", "cispo", "--init-from", sft_ckpt, "--data", data,
         "--out", out, *RL[:-2], "--max-iters", "2", "--eval-interval", "2", "--save-interval", "2", "--seq-len", "512"],
        env=ONE_THREAD)
    log = read_log(out)
    assert log[0]["step"] == 0 and "val_reward_tool" in log[0]  # RL runs evaluate their start point
    assert {"tool_calls", "reward_tool", "reward_exact"} <= set(log[1]) and "val_reward_tool" in log[-1]
    state = json.loads((resolve_checkpoint(out) / "state.json").read_text())
    assert state["args"]["reward"] == "exact tool:0.5" and state["args"]["tools"] == "all"
    # a reward function of one's own, module:function, importable from the run's sys.path
    out = tmp_path / "custom"
    run(["train.py", "--mode", "grpo", "--tools", "calculator", "--init-from", sft_ckpt, "--data", data, "--out", out,
         *RL[:-2], "--reward", "test_post_training:toy_reward", "--max-iters", "1", "--eval-iters", "1",
         "--seq-len", "512"], env={**ONE_THREAD, "PYTHONPATH": str(ROOT / "tests")})
    assert "reward_test_post_training:toy_reward" in read_log(out)[1]


def test_grpo_with_lora_trains_adapters_against_the_base(sft_ckpt, rl_dir, tmp_path):
    out = tmp_path / "lora"
    run(["train.py", "--mode", "ppo", "--lora-rank", "4", "--init-from", sft_ckpt, "--data", rl_dir, "--out", out,
         *RL, "--max-iters", "3", "--eval-interval", "3", "--save-interval", "3", "--lr", "1e-2"], env=ONE_THREAD)
    ckpt = resolve_checkpoint(out)
    assert (ckpt / "adapter.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    assert read_log(out)[-2]["kl"] > 0  # the reference is the base: the adapters switched off
    assert "module" in torch.load(ckpt / "optim.pt", weights_only=True)  # the value head rides along


def test_distill_mode_runs_and_logs_ce_and_kl(sft_ckpt, base_ckpt, sft_dir, tmp_path):
    out = tmp_path / "distill"
    run(["train.py", "--mode", "distill", "--teacher", sft_ckpt, "--init-from", base_ckpt, "--data", sft_dir,
         "--out", out, "--max-iters", "4", "--eval-interval", "4", "--eval-iters", "2", "--save-interval", "4",
         "--log-interval", "1", "--lr", "3e-3"], env=ONE_THREAD)
    log = read_log(out)
    assert all({"ce", "kl"} <= set(r) for r in log if "loss" in r)
    assert {"val_ce", "val_kl"} <= set(log[-1])
    assert log[-2]["kl"] < log[0]["kl"]  # the student moves toward the teacher


def test_rl_modes_chain_from_sft_and_refuse_bad_flags(tmp_path):
    r = run_fail(["train.py", "--mode", "grpo", "--out", tmp_path / "x"], cwd=tmp_path)
    assert "out/sft" in r.stderr and "--mode=sft" in r.stderr
    r = run_fail(["train.py", "--mode", "distill", "--out", tmp_path / "y"], cwd=tmp_path)
    assert "--teacher" in r.stderr


def run_fail(args, cwd):
    r = subprocess.run([sys.executable, str(ROOT / args[0]), *map(str, args[1:])], cwd=cwd, capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stderr
    return r

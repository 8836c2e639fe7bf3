"""SFT and DPO tests: chat data with exact loss masks (prepare.py sft|dpo), packed rows without
cross-talk between conversations, --mode=sft learns the assistant format and stops at <|im_end|>,
--mode=dpo matches an unpacked reference computation and raises the held-out reward accuracy,
DPO under torchrun (2 processes, gloo) follows one process.

    python -m pytest tests/test_sft_dpo.py -q
"""
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import prepare
from checkpoint import load_checkpoint, load_for_inference, resolve_checkpoint
from tokenizer import EMPTY_THINK, EOS, Tokenizer, render_chat
from conftest import ANSWERS, OBJECTS, ONE_THREAD, ROOT, SYSTEM, qa, read_log, run, run_single_and_ddp
from minimind import MiniMind, ModelConfig
from data import DPOData, SFTData, fit_pair, pack_rows
from losses import DPO, DPOConfig, ReferenceCache, reference_logprobs, sequence_logprobs, weights_hash


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def read_split(d, split="train", kind="sft"):
    tokens = np.fromfile(d / f"{split}.bin", dtype=np.uint16)
    mask = np.fromfile(d / f"{split}.mask", dtype=np.uint8)
    idx = np.fromfile(d / f"{split}.idx", dtype=np.int64)
    return tokens, mask, (idx if kind == "sft" else idx.reshape(-1, 4))


def runs_of_ones(mask):
    """[(start, end)] of the maximal runs of 1 in a 0/1 array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[0::2], edges[1::2]))


CONVERSATIONS = [
    qa("小明"),
    [{"role": "system", "content": SYSTEM}, *qa("老师"), *qa("我们")],  # multi-turn with a system prompt
    [{"role": "user", "content": "The cat likes the sea."}, {"role": "assistant", "content": " leading space\n\nand lines"}],
]


# -----------------------------------------------------------------------------
# prepare.py sft / dpo

def test_sft_tokens_are_the_chat_template_and_the_mask_covers_exactly_the_replies(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in CONVERSATIONS])
    run(["prepare.py", "sft", "--input", src, "--tokenizer", tokenizer_dir, "--out", tmp_path / "d",
         "--val-fraction", "0", "--workers", "2", "--quiet"])
    tok = Tokenizer(tmp_path / "d" / "tokenizer")
    tokens, mask, offsets = read_split(tmp_path / "d")
    assert offsets[0] == 0 and offsets[-1] == len(tokens) == len(mask) and len(offsets) == len(CONVERSATIONS) + 1
    newline = tok.encode("\n")
    for msgs, a, b in zip(CONVERSATIONS, offsets[:-1], offsets[1:]):
        ids, m = tokens[a:b].tolist(), mask[a:b]
        # the chat template's tokens, without the newline after the last <|im_end|>
        assert ids + newline == tok.encode(render_chat(msgs))
        replies = [x["content"] for x in msgs if x["role"] == "assistant"]
        runs = runs_of_ones(m)
        assert len(runs) == len(replies)  # every assistant turn is trained
        for (s, e), reply in zip(runs, replies):
            # the reply (its think block, empty here, and its text) and its <|im_end|>, nothing else
            assert tok.decode(ids[s:e]) == EMPTY_THINK + reply + EOS
            assert tok.decode(ids[:s]).endswith("<|im_start|>assistant\n")  # the role header is not trained
            assert ids[e:e + len(newline)] in ([], newline)  # nor the newline after <|im_end|>
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["kind"] == "sft" and meta["train_records"] == 3 and meta["val_records"] == 0
    assert meta["train_trained_tokens"] == int(mask.sum()) and (tmp_path / "d" / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'robot'"),
    ({"conversations": [{"role": "user", "content": "hi"}]}, "does not end with an assistant turn"),
    ({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "message 1: empty content"),
    ({"conversations": []}, "non-empty list of messages"),
    ({"text": "pretraining data"}, "non-empty list of messages"),
])
def test_malformed_conversations_are_described(record, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare.check_conversation(record.get("conversations"))


def test_malformed_records_name_file_and_line_or_are_skipped(tmp_path, tokenizer_dir):
    good = {"conversations": qa("小明")}
    src = write_jsonl(tmp_path / "sft.jsonl", [
        good, {"conversations": [{"role": "user", "content": "hi"}]}, '{"conversations": [', good,
        {"conversations": [{"role": "system", "content": "s"}, {"role": "assistant", "content": ""}]}])
    out = tmp_path / "d"
    r = subprocess.run([sys.executable, "prepare.py", "sft", "--input", str(src), "--tokenizer", str(tokenizer_dir),
                        "--out", str(out), "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and f"{src}:2: the conversation does not end with an assistant turn" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".d.*"))  # no partial output
    run(["prepare.py", "sft", "--input", src, "--tokenizer", tokenizer_dir, "--out", out, "--skip-bad",
         "--val-fraction", "0", "--quiet"])
    meta = json.loads((out / "meta.json").read_text())
    # the record whose only reply is empty is well-formed: left out and counted, not skipped as malformed
    assert meta["skipped_bad"] == 2 and meta["dropped_empty"] == 1 and meta["train_records"] == 2


def test_overlong_conversations_are_truncated_or_dropped_and_counted(tmp_path, tokenizer_dir):
    long_reply = [{"role": "user", "content": "小明喜欢什么？"}, {"role": "assistant", "content": "一本书。" * 40}]
    long_prompt = [{"role": "user", "content": "小明喜欢什么？" * 40}, {"role": "assistant", "content": "一本书。"}]
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in (qa("小明"), long_reply, long_prompt)])
    common = ["--input", src, "--tokenizer", tokenizer_dir, "--max-len", "50", "--val-fraction", "0", "--quiet"]
    run(["prepare.py", "sft", *common, "--out", tmp_path / "t"])
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    # the long reply is cut to 50 tokens; the long prompt leaves no reply within 50 tokens: dropped
    assert (meta["train_records"], meta["truncated"], meta["dropped_overlong"]) == (2, 1, 1)
    tokens, mask, offsets = read_split(tmp_path / "t")
    assert np.diff(offsets).tolist()[1] == 50 and mask[offsets[1]:offsets[2]].any()
    run(["prepare.py", "sft", *common, "--overlong", "drop", "--out", tmp_path / "d"])
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert (meta["train_records"], meta["truncated"], meta["dropped_overlong"]) == (1, 0, 2)


def test_dpo_stores_the_shared_prompt_once_and_both_completions(tmp_path, tokenizer_dir):
    history = qa("小明")
    pairs = [
        {"chosen": qa("老师"), "rejected": qa("老师", "一封信")},
        {"chosen": [{"role": "system", "content": SYSTEM}, *history, *qa("我们")],  # multi-turn: shared history
         "rejected": [{"role": "system", "content": SYSTEM}, *history, *qa("我们", "the sea")]},
        {"chosen": qa("老师"), "rejected": qa("老师")},  # identical: no preference, dropped and counted
        {"chosen": qa("老师"), "rejected": qa("老师")[:1]},  # malformed: skipped with --skip-bad
    ]
    src = write_jsonl(tmp_path / "dpo.jsonl", pairs)
    out = tmp_path / "d"
    r = subprocess.run([sys.executable, "prepare.py", "dpo", "--input", str(src), "--tokenizer", str(tokenizer_dir),
                        "--out", str(out), "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and f"{src}:4: \"rejected\": the conversation does not end with an assistant turn" in r.stderr
    run(["prepare.py", "dpo", "--input", src, "--tokenizer", tokenizer_dir, "--out", out, "--val-fraction", "0",
         "--skip-bad", "--quiet"])
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_records"], meta["dropped_identical"], meta["skipped_bad"]) == (2, 1, 1)
    tok = Tokenizer(out / "tokenizer")
    tokens, mask, index = read_split(out, kind="dpo")
    for pair, (s, p, c, r) in zip(pairs, index.tolist()):
        # the prompt: the shared turns and the header of the reply, never trained
        prompt = render_chat(pair["chosen"][:-1]) + "<|im_start|>assistant\n"
        assert tokens[s:s + p].tolist() == tok.encode(prompt) and not mask[s:s + p].any()
        for key, (a, b) in (("chosen", (s + p, s + p + c)), ("rejected", (s + p + c, s + p + c + r))):
            reply = pair[key][-1]["content"]
            assert tok.decode(tokens[a:b].tolist()) == EMPTY_THINK + reply + EOS and mask[a:b].all()
    assert index[-1, 0] + index[-1, 1:].sum() == len(tokens)


# -----------------------------------------------------------------------------
# packing

def test_pack_rows_places_every_item_once_and_pads_little():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=2000)
    rows = pack_rows(lengths, 512)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    padding = 1 - lengths.sum() / (len(rows) * 512)
    assert padding < 0.03, padding  # padding each item to 512 would waste ~60%
    assert pack_rows(lengths, 512) == rows  # deterministic: every process builds the same plan


def test_packed_rows_have_no_cross_talk(sft_dir, random_ckpt):
    data = SFTData(sft_dir, 256, seed=0)
    model, _, _ = load_checkpoint(random_ckpt)
    batch = data.batch("train", 1, 0, 4, "cpu")
    b = int(batch["doc"].max(dim=1).values.argmax())  # the row with the most conversations
    doc = batch["doc"][b]
    n_docs = int(doc.max())  # documents 0..n_docs-1 are conversations, n_docs the padding tail
    assert n_docs >= 3
    logits, _ = model(batch["idx"][b:b + 1], pos=batch["pos"][b:b + 1], doc=batch["doc"][b:b + 1])
    # every conversation gives the logits it gives alone, in a row of its own
    for d in range(n_docs):
        where = doc == d
        alone, _ = model(batch["idx"][b:b + 1, where])
        assert torch.allclose(logits[0, where], alone[0], atol=1e-4), f"conversation {d} sees its neighbours"
    # changing one conversation changes its own logits and leaves the others' unchanged
    changed = batch["idx"][b:b + 1].clone()
    first = doc == 0
    changed[0, first] = torch.randint(3, 300, (int(first.sum()),), generator=torch.Generator().manual_seed(0))
    logits2, _ = model(changed, pos=batch["pos"][b:b + 1], doc=batch["doc"][b:b + 1])
    assert (logits2[0, first] - logits[0, first]).abs().max() > 1e-2
    assert torch.allclose(logits2[0, ~first], logits[0, ~first], atol=1e-5)


def test_sft_targets_are_the_replies_and_never_cross_conversations(sft_dir):
    data = SFTData(sft_dir, 128, seed=0)
    tok = Tokenizer(sft_dir / "tokenizer")
    batch = data.batch("train", 1, 0, 8, "cpu")
    idx, targets, doc, pos = batch["idx"], batch["targets"], batch["doc"], batch["pos"]
    has = targets >= 0
    assert torch.equal(targets[:, :-1][has[:, :-1]], idx[:, 1:][has[:, :-1]])  # the next token ...
    assert torch.equal(doc[:, :-1][has[:, :-1]], doc[:, 1:][has[:, :-1]])  # ... of the same conversation
    assert not has[:, -1].any()
    answers = {f"{EMPTY_THINK}{s}喜欢{o}。{EOS}" for s, o in ANSWERS.items()}
    for b in range(idx.shape[0]):
        for d in doc[b].unique().tolist():
            where = doc[b] == d
            assert torch.equal(pos[b, where], torch.arange(int(where.sum())))  # positions restart
            t = targets[b, where]
            if idx[b, where][0] == tok.bos_id:  # a conversation: its targets are its replies
                replies = tok.decode(t[t >= 0].tolist())
                assert replies and set(re.findall(rf".+?{re.escape(EOS)}", replies, re.S)) <= answers, replies
            else:  # the padding tail
                assert (idx[b, where] == tok.pad_id).all() and (t == -1).all()


def test_batches_are_a_pure_function_of_seed_step_and_index(sft_dir):
    a, b = SFTData(sft_dir, 128, seed=3), SFTData(sft_dir, 128, seed=3)
    a.micro_batches = b.micro_batches = 2
    for step, index in [(5, 1), (1, 0), (5, 1), (40, 0)]:
        x, y = a.batch("train", step, index, 4, "cpu"), b.batch("train", step, index, 4, "cpu")
        assert all(torch.equal(x[k], y[k]) for k in ("idx", "targets", "pos", "doc"))
    # the stream of rows, one row per step: every epoch visits every row once, each in its own order
    one = SFTData(sft_dir, 128, seed=3)
    n_rows = len(one.splits["train"][3])
    stream = [one.row_ids("train", step, 0, 1)[0] for step in range(1, 2 * n_rows + 1)]
    assert sorted(stream[:n_rows]) == sorted(stream[n_rows:]) == list(range(n_rows))
    assert stream[:n_rows] != stream[n_rows:]
    # micro-batch `index` of `step` takes the next rows of that stream
    for step, index in [(1, 0), (1, 1), (7, 1), (n_rows // 8 + 2, 0)]:
        first = ((step - 1) * 2 + index) * 4
        assert a.row_ids("train", step, index, 4) == stream[first:first + 4]
    assert SFTData(sft_dir, 128, seed=4).row_ids("train", 1, 0, 8) != a.row_ids("train", 1, 0, 8)


# -----------------------------------------------------------------------------
# training

def test_sft_inherits_the_base_and_answers_in_the_assistant_format(sft_ckpt, base_ckpt):
    log = read_log(sft_ckpt)
    train = [r["loss"] for r in log if "loss" in r]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(train) == 60 and len(val) == 2
    assert np.mean(train[-10:]) < 0.5 * np.mean(train[:5]) and val[-1] < 1.0, (train[:5], train[-10:], val)
    ckpt = resolve_checkpoint(sft_ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["kind"] == "sft" and (ckpt / "tokenizer" / "tokenizer.json").exists()
    assert state["args"]["seq_len"] == 128 and state["args"]["batch_size"] == 8  # inherited from the base
    assert json.loads((ckpt / "config.json").read_text()) == json.loads((resolve_checkpoint(base_ckpt) / "config.json").read_text())
    model, tok, _, _ = load_for_inference(sft_ckpt, "cpu")  # as sample.py and serve.py load it
    pattern = re.compile(rf"({'|'.join(ANSWERS)})喜欢({'|'.join(OBJECTS)})。")
    for subject in list(ANSWERS)[:3]:
        prompt = tok.encode_chat([{"role": "user", "content": f"{subject}喜欢什么？"}])
        out = model.generate(torch.tensor([prompt]), 30, temperature=0, eos_id=tok.eos_id)[0, len(prompt):].tolist()
        assert tok.eos_id in out, tok.decode(out)  # it stops
        reply = tok.decode(out[:out.index(tok.eos_id)])
        assert pattern.fullmatch(reply), reply


def test_dpo_log_probabilities_match_unpacked_sequences(dpo_dir, random_ckpt):
    data = DPOData(dpo_dir, 128, seed=0)
    tokens, mask, items, _ = data.splits["train"]
    policy, _, _ = load_checkpoint(random_ckpt)
    batch = data.batch("train", 1, 0, 2, "cpu")
    logp, n = sequence_logprobs(policy, batch)
    assert batch["n_seqs"] == len(logp) >= 4 and batch["n_seqs"] % 2 == 0
    # the same numbers from each document run alone
    expected_logp, expected_n = [], []
    for b in range(2):
        for d in batch["doc"][b].unique().tolist():
            where = batch["doc"][b] == d
            ids, t = batch["idx"][b, where], batch["targets"][b, where]
            if ids[0] == policy.config.pad_id:  # the padding tail
                continue
            logits, _ = policy(ids[None])
            lp = torch.log_softmax(logits[0].float(), -1)[t >= 0].gather(1, t[t >= 0, None]).sum()
            expected_logp.append(lp)
            expected_n.append(int((t >= 0).sum()))
    assert torch.allclose(logp, torch.stack(expected_logp), atol=1e-3)
    assert n.tolist() == expected_n
    # at the start the policy is the reference: loss log 2, no margin; a changed policy moves both
    for length_norm in (False, True):
        loss_fn = DPO(policy, DPOConfig(beta=0.1, length_norm=length_norm))
        loss, extra = loss_fn(policy, batch)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and extra["reward_margin"].item() == 0
        with torch.no_grad():
            policy.embed.weight.mul_(1.1)
        loss, extra = loss_fn(policy, batch)
        lp, _ = sequence_logprobs(policy, batch)
        with torch.no_grad():
            policy.embed.weight.div_(1.1)
        delta = (lp - torch.stack(expected_logp)) / (torch.tensor(expected_n) if length_norm else 1)
        margin = 0.1 * (delta[0::2] - delta[1::2])
        assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(margin).mean().item(), rel=1e-3)
        assert extra["reward_acc"].item() == pytest.approx((margin > 0).float().mean().item())


def test_fit_pair_cuts_replies_first_and_a_long_prompt_from_its_start():
    assert fit_pair(10, 20, 30, 100) == (10, 20, 30)  # fits: untouched
    assert fit_pair(10, 60, 60, 100) == (10, 40, 40)  # the replies share what the prompt leaves
    assert fit_pair(10, 5, 90, 100) == (10, 5, 75)  # the short one stays whole
    # a prompt that would leave the replies no room (MiniMind keeps it and trains on nothing): it
    # loses its start, just enough for each reply to keep limit // 8 tokens
    p, c, r = fit_pair(60, 40, 40, 100)
    assert (p, c, r) == (38, 12, 12) and 2 * p + c + r <= 100
    assert fit_pair(60, 3, 40, 100) == (42, 3, 13)


def test_dpo_evaluation_covers_every_held_out_pair_with_its_standard_error(dpo_dir, random_ckpt):
    data = DPOData(dpo_dir, 64, seed=0)  # short rows: long pairs are cut, none dropped
    assert data.stats["train"]["truncated"] > 0 and data.stats["train"]["dropped"] == 0
    assert "warning" not in data.describe()
    tokens, mask, items, _ = data.splits["train"]
    for s, p, c, r, full_c in items:  # each kept pair: its prompt's end, then a piece of each reply
        assert c >= 1 and r >= 1 and 2 * p + c + r <= 64 and mask[s + p:s + p + c].any()
    policy, _, _ = load_checkpoint(random_ckpt)
    reference, _, _ = load_checkpoint(random_ckpt)
    with torch.no_grad():
        policy.embed.weight.mul_(1.1)
    objective = DPO(policy, DPOConfig(beta=0.1, reference=str(random_ckpt)))
    n_batches = data.val_batches(1, 10 ** 9)
    rec, margins = {}, []
    for i in range(n_batches):
        batch = data.batch("val", 0, i, 1, "cpu")
        _, metrics = objective.evaluate(policy, batch)
        for k, v in metrics.items():
            rec[f"val_{k}"] = rec.get(f"val_{k}", 0.0) + float(v) / n_batches
        with torch.no_grad():
            lp, _ = sequence_logprobs(policy, batch)
            ref, _ = sequence_logprobs(reference, batch)
        margins.append((lp - ref)[0::2] - (lp - ref)[1::2])
    margins = torch.cat(margins)
    out = objective.summarize(rec, n_batches)
    acc = (margins > 0).float().mean().item()
    assert out["val_pairs"] == len(margins) == data.stats["val"]["items"]
    assert out["val_reward_acc"] == pytest.approx(acc, abs=1e-6)
    assert out["val_reward_acc_se"] == pytest.approx(math.sqrt(acc * (1 - acc) / len(margins)), abs=1e-6)

@pytest.mark.parametrize("use_lora", [False, True])
def test_dpo_cached_reference_gives_the_live_reference_loss(dpo_dir, random_ckpt, tmp_path, use_lora):
    """The reference's scores, computed the first time a batch meets them and cached (ReferenceCache),
    give the loss and metrics of the reference run on every batch, train and val; saved, a new run with
    the same reference reads them back (and frees a copied reference once every pair is scored); another
    reference starts over. LoRA's reference is the same model with its adapters off."""
    import lora
    data_dir = tmp_path / "dpo"
    shutil.copytree(dpo_dir, data_dir)
    data = DPOData(data_dir, 128, seed=0)
    policy, _, _ = load_checkpoint(random_ckpt)
    if use_lora:
        lora.apply_lora(policy, 4, 8.0, ["q", "v"])
    live, cached = (DPO(policy, DPOConfig(beta=0.1)) for _ in range(2))
    assert "0 of" in cached.use_cache(data, torch.float32, "cpu")
    batches = [data.batch(split, step, index, 2, "cpu") for split, step, index in (("train", 1, 0), ("val", 0, 0))]
    for batch in batches:  # at the start the policy is the reference
        assert cached(policy, batch)[0].item() == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():  # the policy moves away from the reference
        for name, p in policy.named_parameters():
            p.add_(0.01 * torch.randn_like(p)) if (not use_lora or "lora_B" in name) else None
    for batch in batches:
        assert cached.cache.lookup(batch) is not None  # met before: the policy alone runs
        (l1, m1), (l2, m2) = live(policy, batch), cached(policy, batch)
        assert l1.item() != pytest.approx(math.log(2), abs=1e-4)
        assert l2.item() == pytest.approx(l1.item(), abs=1e-5)
        assert m2["reward_margin"].item() == pytest.approx(m1["reward_margin"].item(), abs=1e-5)
    cached.save_cache()
    # every pair scored (reference_logprobs) and saved: a new run reads them all
    full = ReferenceCache.open(data, weights_hash(live.reference), torch.float32, "cpu")
    full.scores = reference_logprobs(live.reference, live.ref_mode, data, 4, "cpu", torch.float32)
    full.dirty = True
    full.save()
    again = DPO(policy, DPOConfig(beta=0.1))
    line = again.use_cache(data, torch.float32, "cpu")
    if use_lora:  # the base did not move: its scores are read back
        n = sum(len(a) for a in full.scores.values())
        assert f"{n:,} of {n:,}" in line and again.reference is policy
        assert torch.allclose(again(policy, batches[0])[0], live(policy, batches[0])[0], atol=1e-5)
    else:  # the moved policy is another reference
        assert "0 of" in line


def test_dpo_of_a_moe_policy_adds_the_balance_loss(dpo_dir):
    torch.manual_seed(0)
    vocab = json.loads((dpo_dir / "meta.json").read_text())["vocab_size"]
    model = MiniMind(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                 n_experts=4, top_k=1)).train()
    loss_fn = DPO(model, DPOConfig(beta=0.1, length_norm=False))
    loss, _ = loss_fn(model, DPOData(dpo_dir, 128, seed=0).batch("train", 1, 0, 2, "cpu"))
    aux = sum(block.ffn.aux_loss for block in model.layers).item()
    assert aux > 0 and loss.item() == pytest.approx(math.log(2) + model.config.aux_loss_coef * aux, abs=1e-6)


DPO_FLAGS = ["--mode", "dpo", "--seq-len", "128", "--batch-size", "4", "--eval-iters", "2", "--log-interval", "1"]


def test_dpo_raises_the_held_out_reward_accuracy(sft_ckpt, dpo_dir, tmp_path):
    out = tmp_path / "dpo"
    run(["train.py", "--init-from", sft_ckpt, "--data", dpo_dir, "--out", out, *DPO_FLAGS, "--max-iters", "15",
         "--eval-interval", "5", "--save-interval", "15", "--lr", "1e-3"], env=ONE_THREAD)
    log = read_log(out)
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_loss" in r]
    assert all({"reward_acc", "reward_margin"} <= set(r) for r in train)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and train[0]["reward_margin"] == 0
    assert [r["step"] for r in val] == [5, 10, 15]
    assert all({"val_reward_acc", "val_reward_margin"} <= set(r) for r in val)
    # the start is policy == reference: val_reward_acc 0 (ties), val_loss log 2
    assert val[-1]["val_reward_acc"] >= 0.8 and val[-1]["val_reward_margin"] > 0.5, val
    assert val[-1]["val_loss"] < math.log(2) - 0.2, val
    state = json.loads((resolve_checkpoint(out) / "state.json").read_text())
    assert state["kind"] == "dpo" and state["args"]["beta"] == 0.1


def test_dpo_with_two_processes_matches_one(sft_ckpt, dpo_dir, tmp_path):
    # the same global batch (2 x 4 rows): one process accumulates 2 micro-batches, two processes 1 each
    common = ["--init-from", sft_ckpt, "--data", dpo_dir, *DPO_FLAGS, "--max-iters", "3", "--eval-interval", "3",
              "--save-interval", "3", "--lr", "1e-3", "--batch-tokens", str(2 * 4 * 128)]
    run_single_and_ddp(tmp_path, common, ("loss", "reward_acc", "reward_margin", "val_loss", "val_reward_acc",
                                          "val_reward_margin"), rel=1e-3)


def test_sample_prompt_on_a_chat_checkpoint_uses_the_template(sft_ckpt, tmp_path):
    """`sample.py --prompt` answers a chat checkpoint's user message in the chat template (--raw:
    plain continuation); without --ckpt it takes the newest run under out/ and says so."""
    subject = list(ANSWERS)[0]
    flags = ["--prompt", f"{subject}喜欢什么？", "--temperature", "0", "--max-new-tokens", "30"]
    r = run(["sample.py", "--ckpt", sft_ckpt, *flags], env=ONE_THREAD)
    assert f"{subject}喜欢{ANSWERS[subject]}。" in r.stdout and "chat template" in r.stderr
    raw = run(["sample.py", "--ckpt", sft_ckpt, *flags, "--raw"], env=ONE_THREAD)
    assert raw.stdout.startswith(f"{subject}喜欢什么？") and "chat template" not in raw.stderr
    (tmp_path / "out").mkdir()
    shutil.copytree(sft_ckpt, tmp_path / "out" / "sft")
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *flags], cwd=tmp_path, capture_output=True,
                       text=True, env=ONE_THREAD)
    assert r.returncode == 0 and "out/sft, the newest run under out/" in r.stderr, r.stderr
    assert f"{subject}喜欢{ANSWERS[subject]}。" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *flags], cwd=tmp_path / "out", capture_output=True,
                       text=True, env=ONE_THREAD)
    assert r.returncode != 0 and "no run under out/" in r.stderr and "Traceback" not in r.stderr

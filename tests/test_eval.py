"""eval.py and scoring.py: what the numbers mean, checked against hand computations and lm-eval.

    python -m pytest tests/test_eval.py -q

- windows: every token scored once, with the context promised; the same windows as lm-eval's
  loglikelihood_rolling; windowed scores equal a forward pass over each token's own context
- bits per byte of a small text against a hand computation from the model's logits
- token_logprobs (the /v1/completions logprobs + echo pieces) against the forward pass, and the
  OpenAI `logprobs` object built from them
- multiple choice: per-item log-likelihoods and accuracies of `eval.py --hf` on an export equal
  lm-evaluation-harness's `hf` model on a local task (0 and 2 shots, letter and option-text
  scoring), and `eval.py --ckpt` equals `--hf` (skipped without lm-eval / transformers)
- C-Eval and CMMLU CSV layouts, prompts report, --runs plot, one-line errors
- train.py logs val_bpb next to val_loss, bits per byte of the val split's decoded text
Builds its own items and models: no benchmark data, no network.
"""
import json
import math
import re
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ONE_THREAD, ROOT, read_log, run
import scoring
from checkpoint import load_for_inference, save_checkpoint
from minimind import MiniMind, ModelConfig
from tokenizer import Tokenizer, token_bytes

evaluate = pytest.importorskip("eval")  # the script, imported (tests may import scripts)

pytestmark = pytest.mark.usefixtures("one_thread")

# handmade multiple-choice items (no benchmark data): one subject, four options, the answer a letter
ITEMS = [
    {"id": "1", "question": "小明喜欢什么？", "A": "一本书", "B": "大海", "C": "数学", "D": "春天的花", "answer": "B"},
    {"id": "2", "question": "The cat likes what?", "A": "the book", "B": "a letter", "C": "the sea", "D": "数学",
     "answer": "C"},
    {"id": "3", "question": "老师写了什么？ ", "A": "一封信", "B": "the sea", "C": "大海", "D": "一本书", "answer": "A"},
    {"id": "4", "question": "我们研究什么？", "A": "春天的花", "B": "一本书", "C": "数学", "D": "a letter",
     "answer": "C"},
    {"id": "5", "question": "A student reads ___.", "A": "a letter", "B": "the book", "C": "大海", "D": "the sea",
     "answer": "B"},
    {"id": "6", "question": "这只猫看见了什么？", "A": "the sea", "B": "一封信", "C": "春天的花", "D": "大海",
     "answer": "D"},
]
DEV = [
    {"id": "d1", "question": "科学家喜欢什么？", "A": "数学", "B": "一封信", "C": "the book", "D": "大海", "answer": "A"},
    {"id": "d2", "question": "My friend found ___.", "A": "一本书", "B": "the sea", "C": "a letter", "D": "数学",
     "answer": "C"},
]
DESCRIPTION = "以下是关于{subject}的单项选择题，请选出其中的正确答案。\n\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def eval_main(*argv):
    """eval.py in this process (its summary printed to the captured stdout) -> its results."""
    return evaluate.main([*map(str, argv), "--quiet"])


@pytest.fixture(scope="module")
def hf_dir(random_ckpt, tmp_path_factory):
    """random_ckpt exported as a transformers directory."""
    pytest.importorskip("transformers")
    import export
    out = tmp_path_factory.mktemp("hf") / "random-hf"
    export.export_hf(random_ckpt, out)
    return out


# -----------------------------------------------------------------------------
# windows, bits per byte, token log-probabilities

@pytest.mark.parametrize("n,context,stride", [(1, 4, 2), (2, 4, 4), (5, 4, 4), (23, 8, 3), (23, 8, 8), (9, 8, 1),
                                              (64, 16, 5)])
def test_windows_score_each_token_once_with_the_promised_context(n, context, stride):
    scored = []
    for start, end, k in scoring.windows(n, context, stride):
        assert end - 1 - start <= context  # the model reads at most `context` tokens
        for t in range(end - k, end):
            scored.append(t)
            left = t - start  # tokens it is conditioned on
            assert min(t, context - stride + 1) <= left <= context
    assert scored == list(range(1, n))


@pytest.mark.parametrize("n,context,stride", [(23, 8, 3), (23, 8, 8), (40, 16, 5), (7, 16, 4)])
def test_windows_are_lm_evals_rolling_windows(n, context, stride):
    """stride S over a context C = lm-eval's get_rolling_token_windows with context_len C - S + 1,
    bos as its prefix token (S = C: its loglikelihood_rolling)."""
    utils = pytest.importorskip("lm_eval.utils")
    ids = list(range(100, 100 + n))  # ids[0] plays bos
    ours = [(ids[s:e - 1], ids[e - k:e]) for s, e, k in scoring.windows(n, context, stride)]
    theirs = list(utils.get_rolling_token_windows(ids[1:], prefix_token=ids[0], max_seq_len=context,
                                                  context_len=context - stride + 1))
    assert ours == [(list(a), list(b)) for a, b in theirs]


def test_windowed_scores_equal_each_tokens_own_forward_pass(loaded):
    model, tok = loaded
    ids = [tok.bos_id] + tok.encode("小明喜欢大海。The cat likes the sea. 老师写了一封信。")
    context, stride = 8, 3
    got, n = scoring.text_nll(model, ids, context, stride)
    assert n == len(ids) - 1
    want = 0.0
    for start, end, k in scoring.windows(len(ids), context, stride):
        for t in range(end - k, end):  # token t alone, after exactly the tokens its window gives it
            logits, _ = model(torch.tensor([ids[start:t]]))
            want -= F.log_softmax(logits[0, -1].double(), -1)[ids[t]].item()
    assert got == pytest.approx(want, abs=1e-4)


def test_bits_per_byte_by_hand(loaded, random_ckpt, tmp_path):
    model, tok = loaded
    text = "小明喜欢大海。The cat likes the sea. 老师写了一封信。"
    ids = [tok.bos_id] + tok.encode(text)
    logits, _ = model(torch.tensor([ids]))  # the whole text fits the context: one forward pass
    logp = F.log_softmax(logits[0, :-1].double(), -1)
    nats = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)  # Chinese characters are 3 bytes each
    bpb = nats / math.log(2) / n_bytes
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    write_jsonl(tmp_path / "t.jsonl", [{"text": text}, {"text": text}])
    res = eval_main("--ckpt", random_ckpt, "--text", tmp_path / "t.txt", tmp_path / "t.jsonl")[0]["text"]
    one, two = res["files"][str(tmp_path / "t.txt")], res["files"][str(tmp_path / "t.jsonl")]
    assert (one["tokens"], one["bytes"]) == (len(ids) - 1, n_bytes)
    assert one["nats"] == pytest.approx(nats, abs=1e-4)
    assert one["loss"] == pytest.approx(nats / (len(ids) - 1), abs=1e-5)
    assert one["bpb"] == pytest.approx(bpb, abs=1e-5)
    assert (two["tokens"], two["bytes"]) == (2 * one["tokens"], 2 * n_bytes)  # each line a document
    assert two["bpb"] == pytest.approx(bpb, abs=1e-5) and res["bpb"] == pytest.approx(bpb, abs=1e-5)
    # in windows shorter than the text the first tokens score the same and the total is close
    short = eval_main("--ckpt", random_ckpt, "--text", tmp_path / "t.txt", "--context", 8, "--stride", 4)[0]["text"]
    assert (short["tokens"], short["context"], short["stride"]) == (len(ids) - 1, 8, 4)
    assert short["nats"] == pytest.approx(scoring.text_nll(model, ids, 8, 4)[0], abs=1e-4)


def test_token_logprobs_equal_the_forward_pass(loaded):
    model, tok = loaded
    ids = [tok.bos_id] + tok.encode("The cat likes the sea. 这只猫喜欢大海。")
    logprobs, top = scoring.token_logprobs(model, ids, context=256, top_n=3)
    logp = F.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)  # (T, V)
    assert logprobs[0] is None and top[0] is None and len(logprobs) == len(top) == len(ids)
    for i in range(1, len(ids)):
        assert logprobs[i] == pytest.approx(logp[i - 1, ids[i]].item(), rel=1e-6, abs=1e-4)
        values, indices = logp[i - 1].topk(3)
        assert [t for t, _ in top[i]] == indices.tolist()
        assert [v for _, v in top[i]] == pytest.approx(values.tolist(), rel=1e-6, abs=1e-4)
    # in windows (a sequence longer than the context): each token after exactly its window's tokens
    windowed, _ = scoring.token_logprobs(model, ids, context=6, stride=2)
    for start, end, k in scoring.windows(len(ids), 6, 2):
        for t in range(end - k, end):
            own = F.log_softmax(model(torch.tensor([ids[start:t]]))[0][0, -1].float(), -1)[ids[t]].item()
            assert windowed[t] == pytest.approx(own, rel=1e-6, abs=1e-4)
    assert scoring.token_logprobs(model, ids, context=256)[1][1:] == [[]] * (len(ids) - 1)  # top_n = 0


def test_openai_logprobs_object(loaded):
    model, tok = loaded
    prompt, completion = "这只猫", "喜欢大海。"
    ids = [tok.bos_id] + tok.encode(prompt + completion)
    logprobs, top = scoring.token_logprobs(model, ids, context=256, top_n=2)
    table = token_bytes(tok)
    echo = scoring.openai_logprobs(table, ids[1:], logprobs[1:], top[1:])  # echo: the prompt's tokens too
    assert len(echo["tokens"]) == len(ids) - 1 and echo["token_logprobs"] == logprobs[1:]
    assert all(len(t) == 2 for t in echo["top_logprobs"])
    assert echo["text_offset"][0] == 0 and echo["text_offset"] == sorted(echo["text_offset"])
    whole = [t for t in echo["tokens"] if not t.startswith("bytes:")]
    if len(whole) == len(echo["tokens"]):  # every token whole characters: they spell the text
        assert "".join(echo["tokens"]) == prompt + completion
    # a token holding part of a character is shown as its bytes
    assert scoring.token_text("猫".encode()[:2]) == "bytes:\\xe7\\x8c"
    # without echo, offsets start after the prompt
    n_prompt = len(tok.encode(prompt))
    tail = scoring.openai_logprobs(table, ids[1 + n_prompt:], logprobs[1 + n_prompt:], top[1 + n_prompt:],
                                   text_offset=len(prompt))
    assert tail["text_offset"][0] == len(prompt) and tail["tokens"] == echo["tokens"][n_prompt:]


def test_encode_pair_moves_trailing_space_into_the_continuation(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    ctx, cont = scoring.encode_pair(tok.encode, "The cat likes ", "the sea", prefix=[tok.bos_id])
    assert ctx == [tok.bos_id] + tok.encode("The cat likes")
    assert ctx + cont == [tok.bos_id] + tok.encode("The cat likes the sea")


# -----------------------------------------------------------------------------
# multiple choice against lm-evaluation-harness

LM_EVAL_SCRIPT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
tasks, hf, out = sys.argv[1], sys.argv[2], sys.argv[3]
names = ["mm_letter_0", "mm_text_0", "mm_letter_2", "mm_text_2"]
r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=names, device="cpu",
                            batch_size=8, task_manager=TaskManager(include_path=tasks), log_samples=True)
res = {}
for name in names:
    samples = sorted(r["samples"][name], key=lambda s: s["doc_id"])
    res[name] = {"lls": [[ll for ll, _ in s["filtered_resps"]] for s in samples],
                 "acc": r["results"][name]["acc,none"], "acc_norm": r["results"][name]["acc_norm,none"],
                 "acc_stderr": r["results"][name]["acc_stderr,none"],
                 "contexts": [s["arguments"][0][0] for s in samples]}
json.dump(res, open(out, "w"), ensure_ascii=False)
"""


def lm_eval_tasks(d, test, dev):
    """Local lm-eval tasks: ceval's template (letter) and the options' own text (cloze), 0 and 2
    shots from the dev file (first_n, as ceval), bos as the first thing of the description."""
    options = "\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}"
    styles = {"letter": (options, '["A", "B", "C", "D"]'), "text": ("", "{{[A, B, C, D]}}")}
    description = "<|im_start|>" + DESCRIPTION.replace("{subject}", "demo").replace("\n", "\\n")
    for style, (opts, choices) in styles.items():
        for shots in (0, 2):
            (d / f"{style}_{shots}.yaml").write_text(textwrap.dedent(f"""\
                task: mm_{style}_{shots}
                dataset_path: json
                dataset_kwargs:
                  data_files:
                    test: {test}
                    dev: {dev}
                test_split: test
                fewshot_split: dev
                fewshot_config:
                  sampler: first_n
                num_fewshot: {shots}
                output_type: multiple_choice
                description: "{description}"
                doc_to_text: "{{{{question.strip()}}}}{opts}\\n答案："
                doc_to_choice: '{choices}'
                doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
                metric_list:
                  - metric: acc
                    aggregation: mean
                    higher_is_better: true
                  - metric: acc_norm
                    aggregation: mean
                    higher_is_better: true
                """), encoding="utf-8")
    return d


def test_multiple_choice_matches_lm_eval_and_ckpt_matches_hf(random_ckpt, hf_dir, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it
    test = write_jsonl(tmp_path / "demo_test.jsonl", ITEMS)
    dev = write_jsonl(tmp_path / "demo_dev.jsonl", DEV)
    tasks = lm_eval_tasks(tmp_path, test, dev)
    env = {**ONE_THREAD, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    (tmp_path / "lm_eval_run.py").write_text(LM_EVAL_SCRIPT)
    r = subprocess.run([sys.executable, str(tmp_path / "lm_eval_run.py"), str(tasks), str(hf_dir),
                        str(tmp_path / "lm_eval.json")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads((tmp_path / "lm_eval.json").read_text())
    worst = {"lm-eval vs --hf": 0.0, "--ckpt vs --hf": 0.0}
    for shots in (0, 2):
        common = ["--mc", test, "--mc-dev", dev, "--shots", shots, "--mc-description", DESCRIPTION, "--context", 2048]
        hf, ckpt = eval_main("--hf", hf_dir, "--ckpt", random_ckpt, *common)
        for style in ("letter", "text"):
            want = theirs[f"mm_{style}_{shots}"]
            ours = [it[f"{style}_lls"] for it in hf["mc"]["items"]]
            diff = np.abs(np.array(ours) - np.array(want["lls"])).max()
            worst["lm-eval vs --hf"] = max(worst["lm-eval vs --hf"], diff)
            assert worst["lm-eval vs --hf"] <= 1e-4, (style, shots)
            assert hf["mc"][style]["acc"] == pytest.approx(want["acc"])
            assert hf["mc"][style]["acc_norm"] == pytest.approx(want["acc_norm"])
            assert hf["mc"][style]["acc_stderr"] == pytest.approx(want["acc_stderr"])
            same_model = [it[f"{style}_lls"] for it in ckpt["mc"]["items"]]
            worst["--ckpt vs --hf"] = max(worst["--ckpt vs --hf"], np.abs(np.array(same_model) - np.array(ours)).max())
            assert worst["--ckpt vs --hf"] <= 1e-4
            assert {k: ckpt["mc"][style][k] for k in ("acc", "acc_norm")} == \
                {k: hf["mc"][style][k] for k in ("acc", "acc_norm")}
    print("largest log-likelihood differences:", worst)  # pytest -s shows them
    # the scores are not all alike: the comparison compares something
    assert len({round(ll, 3) for it in hf["mc"]["items"] for ll in it["text_lls"]}) > 10


# -----------------------------------------------------------------------------
# input formats, prompts, runs, errors

def test_ceval_and_cmmlu_csv_layouts(tmp_path):
    ceval = tmp_path / "accountant_val.csv"
    ceval.write_text("id,question,A,B,C,D,answer,explanation\n0,一加一等于几？,1,2,3,4,B,\n"
                     "1,\"Which, with a comma?\",x,y,z,w,D,because\n", encoding="utf-8")
    cmmlu = tmp_path / "agronomy.csv"
    cmmlu.write_text("\ufeff,Question,A,B,C,D,Answer\n0,水稻是什么？,粮食,水果,蔬菜,花,A\n", encoding="utf-8")
    a, b = evaluate.read_mc(ceval), evaluate.read_mc(cmmlu)
    assert [(i["subject"], i["id"], i["answer"]) for i in a] == [("accountant", "0", 1), ("accountant", "1", 3)]
    assert a[1]["question"] == "Which, with a comma?" and a[1]["options"] == ["x", "y", "z", "w"]
    assert [(i["subject"], i["question"], i["options"][0], i["answer"]) for i in b] == [("agronomy", "水稻是什么？", "粮食", 0)]
    js = write_jsonl(tmp_path / "x.jsonl", [{"question": "q?", "choices": ["a", "b", "c"], "answer": 2,
                                             "subject": "s"}])
    assert [(i["subject"], i["options"], i["answer"]) for i in evaluate.read_mc(js)] == [("s", ["a", "b", "c"], 2)]
    item = evaluate.read_mc(ceval)[0]
    assert evaluate.mc_context(item, [], "letter", "", "答案：") == "一加一等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    assert evaluate.mc_context(item, [item], "text", "{subject}: ", "答案：") == \
        "accountant: 一加一等于几？\n答案： 2\n\n一加一等于几？\n答案："


def test_prompts_report_side_by_side(random_ckpt, hf_dir, tmp_path):
    report = tmp_path / "report.md"
    results = eval_main("--ckpt", random_ckpt, "--hf", hf_dir, "--prompts", "--report", report, "--prompt-format",
                        "chat", "--max-new-tokens", 6, "--temperature", 0, "--json", tmp_path / "r.json")
    text = report.read_text(encoding="utf-8")
    for _, _, turns in evaluate.PROMPTS:
        for user in turns:
            assert user in text
    assert results[0]["model"]["name"] in text and results[1]["model"]["name"] in text and "tok/s" in text
    ckpt, hf = ([t["reply"] for p in r["prompts"] for t in p["turns"]] for r in results)
    assert ckpt == hf  # the same weights, greedy: minimind and transformers say the same
    assert sum(len(r) > 0 for r in ckpt) > len(ckpt) // 2
    multi = [p for p in results[1]["prompts"] if len(p["turns"]) > 1]
    assert multi and multi[0]["format"] == "chat"
    # by default a pretrain checkpoint continues bos + text, a transformers model chats
    prompts = tmp_path / "p.txt"
    prompts.write_text("小明喜欢\nThe cat\n", encoding="utf-8")
    raw, chat = eval_main("--ckpt", random_ckpt, "--hf", hf_dir, "--prompts", prompts, "--report", report,
                          "--max-new-tokens", 4)
    assert [p["format"] for p in raw["prompts"]] == ["raw", "raw"] and chat["prompts"][0]["format"] == "chat"
    assert json.loads((tmp_path / "r.json").read_text())["results"][1]["prompts"] == results[1]["prompts"]


def test_runs_plot_every_checkpoint(tokenizer_dir, random_ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    tok = Tokenizer(tokenizer_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
    run_dir = tmp_path / "run"
    for step in (10, 20, 30):  # the run keeps the newest 2
        torch.manual_seed(step)
        save_checkpoint(run_dir, step, MiniMind(cfg), {"kind": "pretrain", "args": {"seq_len": 64}},
                        tokenizer_dir=tokenizer_dir)
    write_jsonl(tmp_path / "t.jsonl", [{"text": "小明喜欢大海。The cat likes the sea."}])
    write_jsonl(tmp_path / "demo_test.jsonl", ITEMS[:3])
    results = eval_main("--runs", run_dir, random_ckpt / "ckpt_000000", "--text", tmp_path / "t.jsonl", "--mc",
                        tmp_path / "demo_test.jsonl", "--plot", tmp_path / "p.png", "--json", tmp_path / "r.json")
    assert [r["model"]["step"] for r in results] == [20, 30, 0]
    assert all(r["text"]["bpb"] > 0 and 0 <= r["mc"]["letter"]["acc"] <= 1 for r in results)
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 3


@pytest.mark.parametrize("argv,message", [
    ([], "nothing to evaluate"),
    (["--text", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["--mc", "{tmp}/bad_test.csv"], "bad_test.csv:2: answer"),
    (["--mc", "{tmp}/bad.jsonl"], "bad.jsonl:1: malformed JSON line"),
    (["--mc", "{tmp}/demo_test.jsonl", "--shots", "2"], "subject 'demo' has 0 --mc-dev items"),
    (["--text", "{tmp}/t.txt", "--ckpt", "{tmp}/nowhere"], "nowhere: no such checkpoint"),
    (["--text", "{tmp}/t.txt", "--hf", "{tmp}"], "not a transformers model directory"),
    (["--text", "{tmp}/t.jsonl", "--ckpt", "{ckpt}"], "t.jsonl:1: no \"text\" string"),
])
def test_bad_inputs_are_one_line_errors(random_ckpt, tmp_path, capsys, argv, message):
    (tmp_path / "bad_test.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,\n", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("hello", encoding="utf-8")
    write_jsonl(tmp_path / "t.jsonl", [{"content": "hello"}])
    write_jsonl(tmp_path / "demo_test.jsonl", ITEMS[:1])
    argv = [a.format(tmp=tmp_path, ckpt=random_ckpt) for a in argv]
    if not any(a in argv for a in ("--ckpt", "--hf")) and argv:
        argv += ["--ckpt", str(random_ckpt)]
    with pytest.raises(SystemExit) as e:
        eval_main(*argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err


# -----------------------------------------------------------------------------
# train.py: val_bpb

def test_pretraining_logs_val_bpb(pretrain_dir, tmp_path):
    out = tmp_path / "run"
    run(["train.py", "--data", pretrain_dir, "--out", out, "--model", "tiny", "--batch-size", "2", "--seq-len", "32",
         "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--save-interval", "4"], env=ONE_THREAD)
    evals = [r for r in read_log(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    # bytes per token of the val split, from the text it decodes to
    tok = Tokenizer(pretrain_dir / "tokenizer")
    val = np.fromfile(pretrain_dir / "val.bin", dtype=np.uint16)
    bytes_per_token = len(tok.decode(val.tolist(), skip_special_tokens=True).encode("utf-8")) / len(val)
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / bytes_per_token, rel=1e-9)


def test_report_card_of_tiny_runs(base_ckpt, sft_ckpt, dpo_dir, tmp_path):
    """eval.py --card on tiny runs: each stage's training from its log, held-out bits per byte in Chinese
    and English, DPO's held-out reward accuracy with its standard error, the replies counted clean, curves."""
    import report
    dpo = tmp_path / "dpo"
    run(["train.py", "--mode", "dpo", "--init-from", sft_ckpt, "--data", dpo_dir, "--out", dpo, "--seq-len", "128",
         "--batch-size", "4", "--eval-iters", "1", "--max-iters", "3", "--eval-interval", "3"], env=ONE_THREAD)
    card = tmp_path / "report.md"
    r = run(["eval.py", "--card", card, "--ckpt", base_ckpt, "--ckpt", sft_ckpt, "--ckpt", dpo,
             "--max-new-tokens", "8", "--quiet", "--wall-seconds", "90"], env=ONE_THREAD)
    text = card.read_text()
    assert "report card" in r.stdout and (tmp_path / "report.png").stat().st_size > 1000
    assert "| dpo | `" + str(dpo) + "` | 3 |" in text and "the run up to this report: 1.5 min" in text
    assert "held-out reply loss" in text and "model name" not in text and "time budget" not in text
    acc = re.search(r"DPO held-out reward accuracy: ([\d.]+) ± ([\d.]+) \((\d+) pairs", text)
    assert acc and 0 <= float(acc[1]) <= 1 and float(acc[2]) > 0 and int(acc[3]) == len(
        __import__("data").DPOData(dpo_dir, 128, 0).splits["val"][2])
    # a run whose last evaluation scored every held-out pair: the card reads it from the log, and it is what
    # the card computes from the checkpoint and its reference
    full = tmp_path / "dpo-full"
    run(["train.py", "--mode", "dpo", "--init-from", sft_ckpt, "--data", dpo_dir, "--out", full, "--seq-len", "128",
         "--batch-size", "4", "--max-iters", "3", "--eval-interval", "3"], env=ONE_THREAD)
    logged = report.dpo_reward_accuracy(full, "cpu", torch.float32)
    (full / "log.jsonl").rename(full / "log.jsonl.bak")
    computed = report.dpo_reward_accuracy(full, "cpu", torch.float32)
    assert logged["n"] == computed["n"] == int(acc[3])
    assert logged["acc"] == pytest.approx(computed["acc"]) and logged["stderr"] == pytest.approx(computed["stderr"])
    for name in ("zh-text", "zh-chat", "en-chat"):
        assert name in text
    assert len(re.findall(r"replies template-clean as shown", text)) == 2  # sft, dpo: chat; pretrain: raw
    # tool-call validity of the chat models, a line per tool prompt
    tools = text.split("## Tool calls")[1].split("## Loss curves")[0]
    counts = re.findall(r"^### (\S+): tool calls: (\d+) of (\d+) valid$", tools, re.M)
    assert [(int(k) <= 4, n) for _, k, n in counts] == [(True, "4")] * 2
    assert len(re.findall(r"^- \*\*", tools, re.M)) == 8 and "What is the capital of France?" in tools
    # the tiny models' context (their training's 128 tokens) holds no tool prompt: said, not answered
    assert len(re.findall(r"-> the prompt \(\d+ tokens\) does not fit the context \(128\)", tools)) == 8
    assert report.template_clean("你好") and not report.template_clean("a</think>b")
    assert not report.template_clean("assistant\nhi") and report.template_clean(report.reply_parts("x</think>y")[1])


def card_of(tmp_path, name, *flags):
    """eval.py --card in this process on the given runs and flags -> the card's markdown."""
    evaluate.main(["--card", str(tmp_path / f"{name}.md"), *map(str, flags), "--quiet"])
    return (tmp_path / f"{name}.md").read_text()


def test_report_card_in_a_time_budget(base_ckpt, sft_ckpt, tmp_path):
    """--card --max-time 0 cuts to the minimum, a document of each file and a prompt, the same for every model,
    and says so; every section is still there; what it keeps is what the card without a budget has; a budget
    that fits everything cuts nothing."""
    import report
    texts = [write_jsonl(tmp_path / "a.jsonl", [{"text": f"第{i}篇：小明喜欢一本书。"} for i in range(5)]),
             write_jsonl(tmp_path / "b.jsonl", [{"text": "The cat likes the sea."}, {"text": "我们喜欢大海。"}])]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "你好", "category": "x"},
                                                 {"prompt": "Hello", "category": "x"},
                                                 {"prompt": "中国的首都是哪里？", "category": "y"},
                                                 {"turns": ["我叫小明。", "我叫什么名字？"], "category": "z"}])
    common = ["--ckpt", base_ckpt, "--ckpt", sft_ckpt, "--text", *texts, "--prompts", prompts, "--max-new-tokens",
              "6", "--threads", "1", "--context", "1024"]  # a context the tool prompts fit
    full, cut, roomy = (card_of(tmp_path, "full", *common), card_of(tmp_path, "cut", *common, "--max-time", "0"),
                        card_of(tmp_path, "roomy", *common, "--max-time", "30"))
    assert "time budget" not in full
    assert re.search(r"- this card: \d+ s of its 0 s time budget \(--max-time\); cut to fit it: held-out text, "
                     r"2 of 7 documents; replies, 1 of 4 prompts", cut)
    assert "(lower is better; time budget: a 1 of 5, b 1 of 2 documents" in cut
    assert "Replies to 1 of 4 prompts (time budget" in cut
    assert "; tool calls, 1 of 4 tool prompts" in cut and "Tool prompts: 1 of 4 (time budget" in cut
    assert re.search(r"^### sft/ckpt_000060: tool calls: [01] of 1 valid$", cut, re.M) and "does not fit" not in full
    for section in ("## Training", "## Held out", "| base/ckpt_000000 |", "| sft/ckpt_000060 |", "## Replies",
                    "## Tool calls", "## Loss curves"):
        assert section in full and section in cut
    # the one prompt kept is the first in the fixed order, answered with the seed it has in the full card
    kept = re.findall(r"^- \*\*.*", cut.split("## Tool calls")[0], re.M)
    assert kept == re.findall(r"^- \*\*你好\*\*.*", full, re.M) and "1/1 replies template-clean" in cut
    # the one tool prompt kept is the first, its greedy reply the same as in the full card
    first = re.escape(report.TOOL_PROMPTS[0][1])
    assert re.findall(rf"^- \*\*{first}\*\*.*", cut, re.M) == re.findall(rf"^- \*\*{first}\*\*.*", full, re.M)[:1]
    assert evaluate.prompt_order([("c", "", [])] * 2 + [("d", "", [])] * 2 + [("e", "", [])]) == [0, 2, 4, 1, 3]
    # the seeded order keeps the documents of a cut the same from card to card
    assert evaluate.doc_order({"a": list("abcdef")}) == evaluate.doc_order({"a": list("abcdef")})
    assert "nothing cut" in roomy
    assert roomy.split("## Training")[1].replace("roomy.png", "full.png") == full.split("## Training")[1]


def test_tool_call_validity_counted():
    """report.tool_call_verdict / tool_calls_section on hand-written replies: only a parsed call of an offered
    tool whose arguments fit its schema is valid; every other reply says what was wrong."""
    import report
    call = lambda body: f"<tool_call>\n{body}\n</tool_call>"  # noqa: E731
    offered = ["calculator", "unit_convert", "lookup"]
    replies = {
        "valid": call('{"name": "calculator", "arguments": {"expression": "(17 + 25) * 3"}}'),
        "valid, said first": "Let me check. " + call('{"name": "lookup", "arguments": {"key": "France"}}'),
        "bad JSON": call('{"name": "calculator", "arguments": {"expression": "1+"'),
        "unknown tool": call('{"name": "weather", "arguments": {"city": "Paris"}}'),
        "bad arguments": call('{"name": "unit_convert", "arguments": {"value": "five", "from_unit": "km", '
                              '"to_unit": "mi"}}'),
        "missing argument": call('{"name": "lookup", "arguments": {}}'),
        "one of two bad": call('{"name": "lookup", "arguments": {"key": "iron"}}') + call('{"name": "calc"}'),
        "no call": "The answer is 126.",
        "unclosed": '<tool_call>{"name": "lookup", "arguments": {"key": "iron"}}',
    }
    verdicts = {k: report.tool_call_verdict(r, offered) for k, r in replies.items()}
    assert verdicts["valid"] == ('calculator({"expression": "(17 + 25) * 3"})', None)
    assert verdicts["valid, said first"] == ('lookup({"key": "France"})', None)
    errors = {k: e for k, (c, e) in verdicts.items() if e is not None}
    assert all(verdicts[k][0] is None for k in errors) and len(errors) == len(replies) - 2
    assert "not valid JSON" in errors["bad JSON"] and "unknown tool 'weather'" in errors["unknown tool"]
    assert "'value' must be a number" in errors["bad arguments"] and "missing argument(s): key" in errors[
        "missing argument"]
    assert errors["no call"] == "no tool call" and "unclosed" in errors["unclosed"]
    assert "unknown tool 'calc'" in errors["one of two bad"]
    # a tool the prompt did not offer is no valid call
    assert "unknown tool 'calculator'" in report.tool_call_verdict(replies["valid"], ["lookup"])[1]
    asked = [{"user": k, "tools": offered, "reply": r, "prompt_tokens": 100, "context": 128}
             for k, r in replies.items()]
    # a prompt longer than the context is no valid call, whatever the (empty) reply
    asked.append({**asked[0], "user": "too long", "prompt_tokens": 128, "reply": ""})
    lines = report.tool_calls_section([{"model": {"name": "m"}, "tools": asked}, {"model": {"name": "raw"}}])
    assert "### m: tool calls: 2 of 10 valid" in lines and len([l for l in lines if l.startswith("- **")]) == 10
    assert "- **unknown tool** -> unknown tool 'weather'" in "\n".join(lines)
    assert "- **too long** -> the prompt (128 tokens) does not fit the context (128)" in lines
    assert '- **valid** -> valid: `calculator({"expression": "(17 + 25) * 3"})`' in lines
    assert report.tool_calls_section([{"model": {"name": "raw"}}]) == []


def test_card_budget_shares_what_is_left():
    """report.CardBudget: a measured kind costs as much again; what is left after the known parts to come is
    shared by the next part and the later parts of kinds not yet measured."""
    import report
    now = [0.0]
    budget = report.CardBudget(100, ["load", "text", "load", "text", "replies", "load", "text", "replies"],
                               clock=lambda: now[0])
    assert budget.until() == pytest.approx(100 / 8)  # nothing measured: an equal share
    now[0] = 2
    budget.done("load", 2)  # two more loads to come: 4 s known
    assert budget.until() == pytest.approx(2 + (98 - 4) / 5)  # text, then text, replies, text, replies
    now[0] = 20
    budget.done("text", 18)
    now[0] = 38
    budget.done("load", 0.5)  # the kind's first measure stays its cost
    budget.done("text", 17.5)
    assert budget.until() == pytest.approx(38 + (62 - 2 - 18) / 2)  # these replies and the last ones
    assert report.fits(0, 1, until=3, clock=lambda: 1.5) and not report.fits(0, 1, until=3, clock=lambda: 2)
    assert report.CardBudget(None, ["load"]).until() is None and report.fits(0, 1, None)

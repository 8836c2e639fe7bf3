"""A sweep of bad inputs over every script's command line: each is refused with a message and a
non-zero exit, never a Python traceback. (prepare.py has its own sweep: tests/test_prepare_errors.py.)

Each case runs the script's main() in this process (fast: no interpreter start per case) from an
empty working directory, so the default paths (out/, data/) hold nothing.

    python -m pytest tests/test_cli_errors.py -q
"""
import json
import traceback

import pytest

import bench
import eval as evaluate
import export
import sample
import serve
import train

SCRIPTS = {"train": train.main, "sample": sample.main, "serve": serve.main, "export": export.main,
           "eval": evaluate.main, "bench": bench.main}

CASES = [
    # train.py
    ("train", ["--mode", "bogus"]),
    ("train", ["--batch-size", "0"]),
    ("train", ["--lr", "nan"]),
    ("train", ["--max-iters", "-3"]),
    ("train", ["--epochs", "1", "--max-iters", "3"]),
    ("train", ["--max-time", "inf"]),
    ("train", ["--kernels", "bogus"]),
    ("train", ["--data", "nowhere", "--out", "o"]),
    ("train", ["--data", "{file}", "--out", "o"]),
    ("train", ["--init-from", "nowhere"]),
    ("train", ["--init-from", "{file}"]),
    ("train", ["--resume", "--out", "nowhere"]),
    ("train", ["--resume", "--force"]),
    ("train", ["--mode", "sft"]),
    ("train", ["--mode", "dpo"]),
    ("train", ["--device", "cuda", "--data", "nowhere"]),
    ("train", ["--device", "bogus"]),
    ("train", ["--dtype", "int8"]),
    ("train", ["--data", "{pretrain}", "--out", "{file}"]),
    ("train", ["--data", "{pretrain}", "--out", "o", "--lora-rank", "4"]),
    ("train", ["--mode", "sft", "--init-from", "{ckpt}", "--data", "{pretrain}"]),
    ("train", ["--mode", "dpo", "--init-from", "{ckpt}", "--data", "nowhere"]),
    ("train", ["--init-from", "{broken}", "--data", "{pretrain}"]),
    # sample.py
    ("sample", ["--prompt", "x"]),
    ("sample", ["--ckpt", "nowhere", "--prompt", "x"]),
    ("sample", ["--ckpt", "{file}", "--prompt", "x"]),
    ("sample", ["--ckpt", "{broken}", "--prompt", "x"]),
    ("sample", ["--ckpt", "{ckpt}"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--chat"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--temperature", "nan"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--top-p", "2"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--top-k", "-1"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--repetition-penalty", "0"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--max-new-tokens", "0"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--device", "cuda"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--dtype", "int4"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--rope-scaling", "bogus"]),
    ("sample", ["--ckpt", "{ckpt}", "--prompt", "x", "--think", "maybe"]),
    # serve.py
    ("serve", ["--ckpt", "nowhere"]),
    ("serve", ["--ckpt", "{broken}"]),
    ("serve", ["--ckpt", "{ckpt}", "--port", "99999"]),
    ("serve", ["--ckpt", "{ckpt}", "--port", "-1"]),
    ("serve", ["--ckpt", "{ckpt}", "--device", "cuda"]),
    ("serve", ["--ckpt", "{ckpt}", "--host", "999.1.1.1", "--port", "0"]),
    # export.py
    ("export", ["--ckpt", "nowhere", "--out", "x"]),
    ("export", ["--ckpt", "{broken}", "--out", "x"]),
    ("export", ["--ckpt", "{ckpt}", "--out", "{file}"]),
    ("export", ["--ckpt", "{ckpt}", "--out", "x", "--dtype", "int8"]),
    ("export", ["--from-hf", "nowhere", "--out", "y"]),
    ("export", ["--from-hf", "{file}", "--out", "y"]),
    ("export", ["--from-hf", "{ckpt}", "--out", "y"]),
    ("export", ["--merge-lora", "{ckpt}", "--out", "z"]),
    ("export", ["--from-minimind", "{file}", "--model", "tiny", "--tokenizer", "{ckpt}/tokenizer", "--out", "w"]),
    ("export", ["--from-minimind", "nowhere.pth", "--model", "tiny", "--tokenizer", "nowhere", "--out", "w"]),
    ("export", ["--out", "x"]),
    ("export", ["--ckpt", "{ckpt}", "--gguf", "model.bin"]),
    ("export", ["--ckpt", "{ckpt}", "--gguf", "m.gguf", "--out", "x"]),
    ("export", ["--from-hf", "{ckpt}", "--gguf", "m.gguf"]),
    ("export", ["--ckpt", "{ckpt}", "--gguf", "m.gguf", "--gguf-type", "q4_0"]),
    ("export", ["--ckpt", "{broken}", "--gguf", "m.gguf"]),
    ("export", ["--ckpt", "nowhere", "--gguf", "m.gguf"]),
    # eval.py
    ("eval", ["--ckpt", "nowhere", "--text", "x"]),
    ("eval", ["--hf", "{file}", "--text", "x"]),
    ("eval", ["--ckpt", "{ckpt}", "--text", "nowhere.jsonl"]),
    ("eval", ["--ckpt", "{ckpt}", "--mc", "{file}"]),
    ("eval", ["--ckpt", "{ckpt}", "--mc", "nowhere.csv", "--shots", "9"]),
    ("eval", ["--ckpt", "{broken}", "--text", "{file}"]),
    ("eval", ["--ckpt", "{ckpt}", "--text", "{file}", "--max-time", "1"]),
    # bench.py
    ("bench", ["--only", "bogus"]),
    ("bench", ["--models", "nope", "--only", "train"]),
    ("bench", ["--device", "cuda"]),
    ("bench", ["--steps", "0", "--only", "train"]),
    ("bench", ["--threads", "-2"]),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, pretrain_dir, random_ckpt):
    """Placeholders of the cases: a plain file, a prepared data dir, a checkpoint, a broken one."""
    import shutil
    root = tmp_path_factory.mktemp("cli")
    (root / "afile.txt").write_text("not what was expected\n")
    broken = root / "broken"
    shutil.copytree(random_ckpt, broken)
    ckpt = next(broken.glob("ckpt_*"))
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "dim": "wide"}))
    return {"file": str(root / "afile.txt"), "pretrain": str(pretrain_dir), "ckpt": str(random_ckpt),
            "broken": str(broken)}


@pytest.mark.parametrize("script,argv", CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
def test_bad_input_is_one_clear_line(script, argv, paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(**paths) for a in argv]
    try:
        SCRIPTS[script](argv)
    except SystemExit as e:
        code = e.code
    except BaseException:  # anything else escapes main(): the user would see a traceback
        pytest.fail(f"{script}.py {' '.join(argv)} raised:\n{traceback.format_exc()}")
    else:
        pytest.fail(f"{script}.py {' '.join(argv)} accepted bad input")
    err = capsys.readouterr().err
    assert code not in (0, None), (code, err)
    message = str(code) if isinstance(code, str) else err
    assert message.strip() and "Traceback" not in message, message


def test_eval_checks_transformers_before_scoring_anything(paths, tmp_path, monkeypatch, capsys):
    """`eval.py --ckpt A --hf B` without transformers stops before loading A, naming the install command."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # `import transformers` fails

    def loaded(*a, **k):
        raise AssertionError("a checkpoint was loaded before the dependencies were checked")
    monkeypatch.setattr(evaluate, "load_for_inference", loaded)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", paths["ckpt"], "--hf", str(tmp_path), "--text", paths["file"]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--hf needs transformers: pip install" in err, err

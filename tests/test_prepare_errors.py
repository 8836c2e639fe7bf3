"""prepare.py on bad inputs: every case stops with one line (or argparse's usage), never a traceback.

    python -m pytest tests/test_prepare_errors.py -q

The cases run in this process through prepare.main (a traceback is an exception other than
SystemExit escaping it); test_prepare.py runs a few of them as real command lines."""
import json
import random

import pytest

import prepare


@pytest.fixture(scope="module")
def files(tmp_path_factory, corpus, tokenizer_dir):
    d = tmp_path_factory.mktemp("bad")
    noise = random.Random(0).randbytes(4096)

    def put(name, data):
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return d / name

    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    f = {
        "corpus": corpus, "tok": tokenizer_dir, "dir": d, "missing": d / "missing.jsonl",
        "empty_jsonl": put("empty.jsonl", ""), "empty_txt": put("empty.txt", "\n\n  \n"),
        "noise_txt": put("noise.txt", noise), "noise_jsonl": put("noise.jsonl", noise),
        "latin1_txt": put("latin1.txt", "好\n\n".encode("utf-8") + b"caf\xe9\n"),
        "array": put("array.jsonl", "[1, 2]\n"),
        "text": put("text.jsonl", '{"text": "只有文本"}\n'),
        "role": put("role.jsonl", json.dumps({"conversations": [{"role": "robot", "content": "x"}]}) + "\n"),
        "no_rejected": put("no_rejected.jsonl", json.dumps({"chosen": msgs}, ensure_ascii=False) + "\n"),
        "a_file": put("a_file", "not a directory"),
    }
    (d / "broken_tok").mkdir()
    (d / "broken_tok" / "tokenizer.json").write_text("{not json")
    f["broken_tok"] = d / "broken_tok"
    (d / "foreign").mkdir()
    (d / "foreign" / "notes.txt").write_text("mine")
    f["foreign"] = d / "foreign"
    return f


# (case, argv with {placeholders} from `files`, a piece of the expected message)
CASES = [
    # inputs that are missing, directories, empty, binary, not UTF-8, of the wrong shape
    ("tokenizer-missing", "tokenizer --input {missing}", "no such file"),
    ("pretrain-missing", "pretrain --input {missing} --tokenizer {tok}", "no such file"),
    ("sft-missing", "sft --input {missing} --tokenizer {tok}", "no such file"),
    ("dpo-missing", "dpo --input {missing} --tokenizer {tok}", "no such file"),
    ("tokenizer-directory", "tokenizer --input {dir}", "a directory"),
    ("pretrain-directory", "pretrain --input {dir} --tokenizer {tok}", "a directory"),
    ("sft-directory", "sft --input {dir} --tokenizer {tok}", "a directory"),
    ("dpo-directory", "dpo --input {dir} --tokenizer {tok}", "a directory"),
    ("tokenizer-empty", "tokenizer --input {empty_txt}", "empty"),
    ("tokenizer-empty-jsonl", "tokenizer --input {empty_jsonl}", "empty"),
    ("pretrain-empty", "pretrain --input {empty_jsonl} --tokenizer {tok}", "empty"),
    ("pretrain-empty-text", "pretrain --input {empty_txt} --tokenizer {tok}", "empty"),
    ("sft-empty", "sft --input {empty_jsonl} --tokenizer {tok}", "empty"),
    ("dpo-empty", "dpo --input {empty_jsonl} --tokenizer {tok}", "empty"),
    ("tokenizer-binary", "tokenizer --input {noise_txt}", "not UTF-8"),
    ("pretrain-binary-text", "pretrain --input {noise_txt} --tokenizer {tok}", "not UTF-8"),
    ("pretrain-binary-jsonl", "pretrain --input {noise_jsonl} --tokenizer {tok}", "not UTF-8"),
    ("sft-binary", "sft --input {noise_jsonl} --tokenizer {tok}", "not UTF-8"),
    ("dpo-binary", "dpo --input {noise_jsonl} --tokenizer {tok}", "not UTF-8"),
    ("tokenizer-latin1-line-3", "tokenizer --input {latin1_txt}", "latin1.txt:3: not UTF-8"),
    ("pretrain-latin1-line-3", "pretrain --input {latin1_txt} --tokenizer {tok}", "latin1.txt:3: not UTF-8"),
    ("pretrain-json-array", "pretrain --input {array} --tokenizer {tok}", "array.jsonl:1"),
    ("sft-json-array", "sft --input {array} --tokenizer {tok}", "array.jsonl:1"),
    ("sft-pretrain-record", "sft --input {text} --tokenizer {tok}", "text.jsonl:1"),
    ("sft-unknown-role", "sft --input {role} --tokenizer {tok}", "unknown role"),
    ("dpo-no-rejected", "dpo --input {no_rejected} --tokenizer {tok}", '"rejected"'),
    ("dpo-sft-record", "dpo --input {role} --tokenizer {tok}", "role.jsonl:1"),
    # tokenizers that are missing, a file, broken
    ("pretrain-tokenizer-missing", "pretrain --input {corpus} --tokenizer {dir}/nowhere", "nowhere"),
    ("sft-tokenizer-missing", "sft --input {corpus} --tokenizer {dir}/nowhere", "nowhere"),
    ("dpo-tokenizer-default-missing", "dpo", "data/tokenizer"),
    ("pretrain-tokenizer-is-file", "pretrain --input {corpus} --tokenizer {a_file}", "a_file"),
    ("pretrain-tokenizer-broken", "pretrain --input {corpus} --tokenizer {broken_tok}", "broken_tok"),
    # outputs that cannot or must not be replaced
    ("pretrain-out-is-file", "pretrain --input {corpus} --tokenizer {tok} --out {a_file}", "not a directory"),
    ("tokenizer-out-unwritable", "tokenizer --input {corpus} --out /sys/minimind-out", "cannot write"),
    ("pretrain-out-foreign", "pretrain --input {corpus} --tokenizer {tok} --out {foreign}", "--force"),
    ("pretrain-out-is-tokenizer", "pretrain --input {corpus} --tokenizer {tok} --out {tok} --force", "inside"),
    ("pretrain-out-is-cwd", "pretrain --input {corpus} --tokenizer {tok} --out . --force", "working directory"),
    # flag values
    ("tokenizer-vocab-10", "tokenizer --input {corpus} --vocab-size 10", "at least"),
    ("tokenizer-vocab-0", "tokenizer --input {corpus} --vocab-size 0", "at least"),
    ("tokenizer-vocab-huge", "tokenizer --input {corpus} --vocab-size 70000", "65535"),
    ("tokenizer-vocab-word", "tokenizer --input {corpus} --vocab-size many", "invalid int"),
    ("tokenizer-max-chars-0", "tokenizer --input {corpus} --max-chars 0", "--max-chars"),
    ("pretrain-val-2", "pretrain --input {corpus} --tokenizer {tok} --val-fraction 2", "--val-fraction"),
    ("pretrain-val-negative", "pretrain --input {corpus} --tokenizer {tok} --val-fraction -0.1", "--val-fraction"),
    ("pretrain-val-nan", "pretrain --input {corpus} --tokenizer {tok} --val-fraction nan", "--val-fraction"),
    ("pretrain-workers-negative", "pretrain --input {corpus} --tokenizer {tok} --workers -1", "--workers"),
    ("pretrain-chunk-0", "pretrain --input {corpus} --tokenizer {tok} --chunk-docs 0", "--chunk-docs"),
    ("sft-max-len-0", "sft --input {corpus} --tokenizer {tok} --max-len 0", "--max-len"),
    ("dpo-max-len-negative", "dpo --input {corpus} --tokenizer {tok} --max-len -5", "--max-len"),
    ("sft-chunk-0", "sft --input {corpus} --tokenizer {tok} --chunk-records 0", "--chunk-records"),
    ("sft-max-record-0", "sft --input {corpus} --tokenizer {tok} --max-record-bytes 0", "--max-record-bytes"),
    ("pretrain-record-over-limit", "pretrain --input {corpus} --tokenizer {tok} --max-record-bytes 20", "corpus.jsonl:1"),
    ("sft-overlong-wrong", "sft --input {corpus} --tokenizer {tok} --overlong cut", "invalid choice"),
    ("pretrain-input-no-files", "pretrain --input --tokenizer {tok}", "expected at least one"),
    ("no-command", "", "required"),
    ("unknown-command", "finetune", "invalid choice"),
]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_stops_in_one_line(argv, needle, files, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # default paths (data/...) land here
    args = [a.format(**files) for a in argv.split()]
    if "--out" not in args and args and args[0] in ("tokenizer", "pretrain", "sft", "dpo"):
        args += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        prepare.main([*args, "--quiet"] if args and args[0] in ("tokenizer", "pretrain", "sft", "dpo") else args)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err
    assert e.value.code not in (0, None)
    if isinstance(e.value.code, str):  # sys.exit(message): printed to stderr as one line
        message = e.value.code
        assert "\n" not in message.strip(), message
    else:  # argparse: usage, then the error
        message = err
    assert needle in message, message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "no output may be left"

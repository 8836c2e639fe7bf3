"""prepare.py download / download.py: MiniMind's dataset files, offline, against a local server that
answers as the Hugging Face hub does (HEAD and GET on /datasets/{repo}/resolve/{rev}/{file} with
X-Repo-Commit, X-Linked-Etag (the SHA-256 of an LFS file), X-Linked-Size, Range requests).

    python -m pytest tests/test_download.py -q

A download killed halfway resumes from its part file (the server sees a Range request from where it
stopped) and the result's SHA-256 is the hub's; a corrupted transfer is refused and its part removed;
an unreachable endpoint is one line; the downloaded MiniMind-format SFT file prepares."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import download  # noqa: E402
import prepare  # noqa: E402
from conftest import run  # noqa: E402

pytest.importorskip("huggingface_hub")

COMMIT = "c0ffee" * 6 + "c0ff"
# MiniMind-3's SFT format (its README): conversations, an assistant turn with reasoning and a tool call
SFT_LINE = {"conversations": [
    {"role": "system", "content": "你是一个乐于助人的助手。", "tools": json.dumps([{"type": "function",
        "function": {"name": "get_time", "description": "current time",
                     "parameters": {"type": "object", "properties": {}}}}])},
    {"role": "user", "content": "现在几点？ What time is it?"},
    {"role": "assistant", "content": "", "tool_calls": json.dumps([{"name": "get_time", "arguments": {}}])},
    {"role": "tool", "content": "{\"time\": \"12:00\"}"},
    {"role": "assistant", "content": "现在是12:00。It is noon.", "reasoning_content": "工具说是12:00。"}]}


class Hub(ThreadingHTTPServer):
    """files: name -> bytes. stall_after: send that many bytes of a GET, then hang until released
    (a network that stops mid-file). corrupt: serve other bytes than the checksum says."""
    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.requests, self.stall_after, self.corrupt = files, [], None, False
        self.release = threading.Event()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _head(self):
        hub = self.server
        hub.requests.append((self.command, self.path, self.headers.get("Range")))
        prefix = f"/datasets/{download.REPO}/resolve/main/"
        name = self.path[len(prefix):] if self.path.startswith(prefix) else None
        if name not in hub.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None, 0
        data = hub.files[name]
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        sha = hashlib.sha256(data).hexdigest()
        for k, v in (("X-Repo-Commit", COMMIT), ("ETag", f'"{sha}"'), ("X-Linked-Etag", f'"{sha}"'),
                     ("X-Linked-Size", str(len(data))), ("Accept-Ranges", "bytes"),
                     ("Content-Length", str(len(data) - start))):
            self.send_header(k, v)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        return data, start

    def do_HEAD(self):
        self._head()

    def do_GET(self):
        data, start = self._head()
        if data is None:
            return
        if self.server.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        body = data[start:]
        if self.server.stall_after is not None:
            self.wfile.write(body[:self.server.stall_after])
            self.wfile.flush()
            self.server.release.wait(30)
            return
        self.wfile.write(body)


@pytest.fixture
def hub():
    rng = random.Random(0)
    pretrain = b"\n".join(json.dumps({"text": f"第{i}篇 doc {rng.random()}"}, ensure_ascii=False).encode()
                         for i in range(60000))  # 2.3 MB: more than a socket buffer, so a stall stalls
    files = {"pretrain_t2t_mini.jsonl": pretrain,
             "sft_t2t_mini.jsonl": (json.dumps(SFT_LINE, ensure_ascii=False) + "\n").encode() * 40}
    server = Hub(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()


def test_interrupted_download_resumes_and_checks(hub, tmp_path):
    name, data = "pretrain_t2t_mini.jsonl", hub.files["pretrain_t2t_mini.jsonl"]
    half = len(data) // 2
    hub.stall_after = half
    fetch = f"import download; download.download_file({name!r}, __import__('pathlib').Path({str(tmp_path)!r}), " \
            f"{hub.url!r}, progress=False)"  # download.py alone: starts in a second, not prepare.py's ten
    proc = subprocess.Popen([sys.executable, "-c", fetch], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    parts = []
    while time.time() < deadline:
        parts = list(tmp_path.glob(f"{name}.*.part"))
        if parts and parts[0].stat().st_size >= half:
            break
        time.sleep(0.05)
    assert parts and parts[0].stat().st_size == half, "the first run never got halfway"
    proc.send_signal(signal.SIGKILL)  # killed: no cleanup of any kind runs
    proc.wait(10)
    hub.release.set()
    t1 = time.time()
    assert not (tmp_path / name).exists()

    hub.stall_after = None
    r = subprocess.run([sys.executable, "prepare.py", "download", name, "--out", tmp_path, "--quiet"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "HF_ENDPOINT": hub.url})
    assert r.returncode == 0, r.stderr
    assert f"prepare.py pretrain --input {tmp_path / name}" in r.stdout
    assert ("GET", f"/datasets/{download.REPO}/resolve/main/{name}", f"bytes={half}-") in hub.requests
    assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert not list(tmp_path.glob("*.part"))

    # a second run leaves the file alone: one HEAD, no GET
    before = len(hub.requests)
    assert download.download_file(name, tmp_path, hub.url, progress=False) == tmp_path / name
    assert [m for m, *_ in hub.requests[before:]] == ["HEAD"]


def test_corrupt_transfer_is_refused(hub, tmp_path):
    hub.corrupt = True
    with pytest.raises(download.DownloadError, match="sha256 .* expected"):
        download.download_file("sft_t2t_mini.jsonl", tmp_path, hub.url, progress=False)
    assert not list(tmp_path.iterdir())  # neither the file nor its part
    with pytest.raises(download.DownloadError, match="no such file"):
        download.download_file("nope.jsonl", tmp_path, hub.url, progress=False)
    # a file it did not write is never replaced
    hub.corrupt = False
    (tmp_path / "sft_t2t_mini.jsonl").write_text("mine")
    with pytest.raises(download.DownloadError, match="move it away"):
        download.download_file("sft_t2t_mini.jsonl", tmp_path, hub.url, progress=False)
    assert (tmp_path / "sft_t2t_mini.jsonl").read_text() == "mine"
    assert download.resolve_names([]) == list(download.DEFAULT)
    assert download.resolve_names(["sft_t2t", "dpo.jsonl"]) == ["sft_t2t.jsonl", "dpo.jsonl"]
    assert download.resolve_names(["all"]) == list(download.FILES)


def test_offline_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # nothing listens on port 9
        prepare.main(["download", "dpo", "--out", str(tmp_path), "--endpoint", "http://127.0.0.1:9", "--quiet"])
    message = str(e.value.code)
    assert message.startswith("error: cannot reach http://127.0.0.1:9 for dpo.jsonl") and "\n" not in message, message
    assert "--endpoint https://hf-mirror.com" in message
    assert not list(tmp_path.iterdir())


def test_downloaded_sft_prepares(hub, tmp_path, tokenizer_dir):
    path = download.download_file("sft_t2t_mini.jsonl", tmp_path / "dataset", hub.url, progress=False)
    run(["prepare.py", "sft", "--input", path, "--tokenizer", tokenizer_dir,
         "--out", tmp_path / "sft", "--workers", "1", "--quiet"])
    meta = json.loads((tmp_path / "sft" / "meta.json").read_text())
    assert meta["train_records"] + meta["val_records"] == 40 and meta["dropped_empty"] == 0, meta

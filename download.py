"""MiniMind's published datasets (the Hugging Face dataset jingyaogong/minimind_dataset), fetched file by
file: resumable across runs, checked against the hub's SHA-256, with a progress bar, from any mirror.

huggingface_hub finds each file (its URL on `endpoint` or HF_ENDPOINT, its size, commit and checksum:
the ETag of a Git LFS file is its SHA-256). The bytes are fetched here with HTTP Range requests into
`NAME.<sha256 prefix>.part` beside the destination, because huggingface_hub (2.x) downloads into a
temporary file it deletes when interrupted: a 14 GB file cut at 90% would start over. The part is
hashed as it grows and renamed to NAME only when its size and SHA-256 match the hub's."""
import hashlib
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tqdm import tqdm

REPO = "jingyaogong/minimind_dataset"
# MiniMind-3's files (its README, 2026-08): name -> (size on the hub, what it is, the prepare.py command)
FILES = {
    "pretrain_t2t_mini.jsonl": ("1.2GB", "pretraining text, quick reproduction", "pretrain"),
    "pretrain_t2t.jsonl": ("10GB", "pretraining text, MiniMind-3's full run", "pretrain"),
    "sft_t2t_mini.jsonl": ("1.6GB", "SFT conversations (tool calls included), quick reproduction", "sft"),
    "sft_t2t.jsonl": ("14GB", "SFT conversations, MiniMind-3's full run", "sft"),
    "dpo.jsonl": ("53MB", "DPO preference pairs", "dpo"),
    "rlaif.jsonl": ("24MB", "RL prompts (PPO / GRPO / CISPO): train.py --mode=grpo --data FILE", None),
    "agent_rl.jsonl": ("86MB", "agentic RL prompts with a verification target (gt)", None),
    "agent_rl_math.jsonl": ("18MB", "agentic RL math prompts with a verification target", None),
    "lora_identity.jsonl": ("small", "LoRA SFT: the model's identity", "sft"),
    "lora_medical.jsonl": ("small", "LoRA SFT: medical questions", "sft"),
}
DEFAULT = ("pretrain_t2t_mini.jsonl", "sft_t2t_mini.jsonl", "dpo.jsonl")  # MiniMind's quick start, plus DPO
CHUNK = 1 << 20
SHA256, SHA1 = re.compile(r"[0-9a-f]{64}"), re.compile(r"[0-9a-f]{40}")


class DownloadError(RuntimeError):
    """A file that cannot be fetched or does not check out; the message is one line that says why."""


def resolve_names(names) -> list:
    """Dataset file names from what a user typed: `sft_t2t_mini` or `sft_t2t_mini.jsonl`, `all`;
    none means DEFAULT. Names not in FILES are kept (the hub may have files this list does not)."""
    if not names:
        return list(DEFAULT)
    if "all" in names:
        return list(FILES)
    return [n if "." in n else n + ".jsonl" for n in names]


def file_info(name: str, endpoint: Optional[str], revision: str):
    """huggingface_hub's metadata of `name`: (download URL, size, SHA-256 or None, commit)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url  # slow to import; only downloads need it
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    url = hf_hub_url(REPO, name, repo_type="dataset", revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)  # no retries: offline says so at once
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        known = ", ".join(FILES)
        raise DownloadError(f"{name}: no such file in {REPO} at {revision} (MiniMind's files: {known})") from None
    except Exception as e:  # the HTTP client's own errors (httpx, requests: they differ between versions)
        where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        first = (str(e).splitlines() or [""])[0][:200]
        raise DownloadError(f"cannot reach {where} for {name} ({type(e).__name__}: {first}); offline? a mirror: "
                            "--endpoint https://hf-mirror.com (or HF_ENDPOINT)") from None
    if meta.size is None:
        raise DownloadError(f"{name}: the server did not say the file's size")
    return meta.location, meta.size, expected_checksum(meta.etag), meta.commit_hash


def expected_checksum(etag: Optional[str]):
    """("sha256" | "git-sha1", hex digest) from the hub's ETag, or None: a Git LFS file's ETag is its
    SHA-256, a small file's is its Git blob id (SHA-1 of "blob SIZE\\0" + content)."""
    if etag and SHA256.fullmatch(etag):
        return "sha256", etag
    if etag and SHA1.fullmatch(etag):
        return "git-sha1", etag
    return None


def new_hash(check, size: int):
    if check and check[0] == "git-sha1":
        return hashlib.sha1(b"blob %d\0" % size)
    return hashlib.sha256()


def _hash_existing(path: Path, h, bar) -> int:
    """Feed the bytes already in `path` to hash `h`; returns how many there are."""
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
            bar.update(len(chunk))
    return n


def _fetch(url: str, part: Path, size: int, h, bar, timeout: float):
    """Append bytes [part's size, size) of `url` to `part`, hashing them."""
    have = part.stat().st_size
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-", "Accept-Encoding": "identity",
                                               "User-Agent": "minimind-prepare"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r, open(part, "ab", buffering=0) as f:
            if have and r.status != 206:  # the server ignored the range: the part cannot be continued
                raise DownloadError(f"{url}: the server does not resume downloads (HTTP {r.status} to a Range request)")
            while chunk := r.read1(CHUNK):  # what has arrived: a stalled network leaves it on disk
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"download of {part.name} interrupted at {part.stat().st_size:,} of {size:,} bytes "
                            f"({reason}); run the same command again to resume") from None


def download_file(name: str, out_dir: Path, endpoint: Optional[str] = None, revision: str = "main",
                  progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch dataset file `name` into `out_dir` (resuming a part an earlier run left), check its size and
    SHA-256, and return its path. A file already at the destination is left as it is (checked by size)."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise DownloadError(f"{name!r}: a file name of the dataset, without directories")
    url, size, check, _ = file_info(name, endpoint, revision)
    dest = out_dir / name
    if dest.exists():
        if dest.stat().st_size != size:
            raise DownloadError(f"{dest} exists with {dest.stat().st_size:,} bytes, the dataset's has {size:,}: "
                                "move it away to download it again")
        return dest
    out_dir.mkdir(parents=True, exist_ok=True)
    part = out_dir / f"{name}.{check[1][:16] if check else 'unchecked'}.part"  # a new version: a new part
    for stale in out_dir.glob(f"{name}.*.part"):  # parts of an older version of the file (other checksum)
        if stale != part:
            stale.unlink()
    part.touch()
    h = new_hash(check, size)
    with tqdm(total=size, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
        if _hash_existing(part, h, bar) > size:
            part.unlink()
            raise DownloadError(f"{part} is longer than the file ({size:,} bytes): removed, run again")
        if part.stat().st_size < size:
            _fetch(url, part, size, h, bar, timeout)
    got = part.stat().st_size
    if got != size or (check and h.hexdigest() != check[1]):
        part.unlink()
        what = (f"{got:,} bytes, expected {size:,}" if got != size
                else f"{check[0]} {h.hexdigest()}, expected {check[1]}")
        raise DownloadError(f"{name}: {what}; the partial file is removed, run again")
    os.replace(part, dest)
    return dest

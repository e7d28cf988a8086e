"""Lay a checkpoint directory out as the Hugging Face hub cache holds a download of it.

No weights can be downloaded here, but the cache a real download ends in can be built: files as
content-addressed blobs, a snapshot directory of relative links to them named by a commit hash,
and `refs/<revision>` naming that commit. `huggingface_hub` (and so vLLM, transformers and this
package) then reads the checkpoint by its hub id, offline, through the same code as after a
download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def repo_folder_name(repo_id: str) -> str:
    """`models--Owner--Name`, the cache's folder for a model repository."""
    return "models--" + repo_id.replace("/", "--")


def place_in_hub_cache(checkpoint: str | Path, repo_id: str, cache_dir: str | Path,
                       revision: str = "main") -> Path:
    """Copy `checkpoint` into the hub cache `cache_dir` (what `HF_HUB_CACHE` names, by default
    `$HF_HOME/hub`) as repository `repo_id` at `revision`; returns the snapshot directory. The
    commit hash is derived from the files, so the same checkpoint gives the same snapshot."""
    checkpoint = Path(checkpoint)
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{checkpoint} holds no files")
    repo = Path(cache_dir) / repo_folder_name(repo_id)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    tree = hashlib.sha1()
    blobs = {}
    for path in files:
        digest = _sha256(path)
        rel = path.relative_to(checkpoint).as_posix()
        tree.update(f"{rel}\0{digest}\n".encode())
        blobs[rel] = digest
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
    commit = tree.hexdigest()
    snapshot = repo / "snapshots" / commit
    for rel, digest in blobs.items():
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    ref = repo / "refs" / revision  # a revision may hold slashes (refs/pr/1)
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["place_in_hub_cache", "repo_folder_name"]

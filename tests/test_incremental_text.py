"""Text that arrives in pieces is tokenized as if it had arrived whole.

`IncrementalTokenizer` commits a token only once later text can no longer change it; the tokens
committed along the way plus those of `close()` must be exactly the prompt's tokens of the whole
text (`prompt.target_text_ids`), wherever the pieces were cut, and tokens must come out before
the text ends where the text allows it.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_qwen3tts.model.incremental_text import IncrementalTokenizer
from vllm_qwen3tts.model.prompt import PromptError, target_text_ids
from vllm_qwen3tts.model.text_tokenizer import load_text_tokenizer

# Characters where a cut is most likely to matter: letters that merge, spaces and newlines whose
# runs split by what follows, apostrophes of contractions, punctuation that joins letters (".com"),
# digits (one pre-token each), CJK runs (one pre-token until punctuation), an emoji (4 bytes).
TRICKY = list("abcdeHsStl") + [" ", "  ", "\n", "\t", "'", "'s", "'ll", ".", ",", "!", "?", "-", "$", "1", "7",
                                "你", "好", "，", "。", "é", "🙂", "don", "com"]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_text_tokenizer(tiny_checkpoint("0.6b-custom_voice"))


def fed_in_pieces(tokenizer, pieces: list[str]) -> tuple[list[int], list[list[int]]]:
    """All tokens, and the tokens each piece made final (the last entry: those of close())."""
    incremental = IncrementalTokenizer(tokenizer)
    per_piece = [incremental.append(p) for p in pieces]
    per_piece.append(incremental.close())
    assert incremental.ids == [t for new in per_piece for t in new]
    return incremental.ids, per_piece


def cut(text: str, rng: random.Random, max_piece: int = 4) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, max_piece)
        pieces.append(text[i:i + n])
        i += n
    return pieces


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(TRICKY), min_size=1, max_size=30), seed=st.integers(0, 2**32 - 1))
def test_any_cut_of_any_text_gives_the_tokens_of_the_whole_text(tokenizer, parts, seed):
    text = "".join(parts)
    if not text.strip():
        return
    pieces = cut(text, random.Random(seed))
    assert fed_in_pieces(tokenizer, pieces)[0] == target_text_ids(tokenizer, text), pieces


@pytest.mark.parametrize("text", [
    "Hello there, how are you today?",
    "I'll say it: don't, won't, can't.",
    "Visit example.com or call 555-0100 now.",
    "Two  spaces and   three, then 42 and  7.",
    "Line one.\n\nLine two\n",
    "\nStarts with a newline.",
    "你好，世界。今天天气很好！",
    "Mixed 中文 and English, café 🙂 ok.",
])
def test_one_character_at_a_time_and_random_pieces_give_the_tokens_of_the_whole_text(tokenizer, text):
    whole = target_text_ids(tokenizer, text)
    assert fed_in_pieces(tokenizer, list(text))[0] == whole
    rng = random.Random(0)
    for _ in range(20):
        assert fed_in_pieces(tokenizer, cut(text, rng, max_piece=7))[0] == whole


def test_tokens_are_committed_while_the_text_is_still_arriving(tokenizer):
    """Only the last word (pre-token) waits for what follows: a client writing one character at a
    time gets every word's tokens once the next word has begun."""
    text = "The quick brown fox jumps over the lazy dog"
    ids, per_piece = fed_in_pieces(tokenizer, list(text))
    before_close = [t for new in per_piece[:-1] for t in new]
    assert before_close == target_text_ids(tokenizer, text[:text.rindex(" ")])
    assert per_piece[-1] == ids[len(before_close):] and per_piece[-1]  # " dog" came with close()


def test_a_cut_inside_a_word_would_change_its_tokens_without_waiting(tokenizer):
    """Why the waiting matters: tokenizing each piece as it comes gives other tokens."""
    text = "Internationalization matters."
    naive = [t for piece in ("Internation", "alization matters.") for t in target_text_ids(tokenizer, piece)]
    assert naive != target_text_ids(tokenizer, text)
    assert fed_in_pieces(tokenizer, ["Internation", "alization matters."])[0] == target_text_ids(tokenizer, text)


def test_no_text_or_text_after_close_is_an_error(tokenizer):
    incremental = IncrementalTokenizer(tokenizer)
    assert incremental.append("") == []
    with pytest.raises(PromptError, match="no tokens"):
        incremental.close()
    incremental = IncrementalTokenizer(tokenizer)
    incremental.append("Done.")
    incremental.close()
    with pytest.raises(PromptError, match="after the input was closed"):
        incremental.append(" More.")

"""The generated Qwen2 BPE files tokenize exactly like the tiktoken ranks they came from."""

from __future__ import annotations

import pytest
import tiktoken

from vllm_qwen3tts.model.text_tokenizer import ADDED_TOKENS, QWEN2_SPLIT_REGEX, load_ranks, load_text_tokenizer, tiktoken_path

CORPUS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n",
    "中文测试：今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "CamelCaseWords and snake_case_words, HTTPServer2Go",
    "https://example.com/path/to/file?query=1&x=y#frag",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "Émile a mangé des crêpes à Montréal ; ça va ?",
    "Tabs\tand\r\nwindows newlines",
    "emoji 👩‍💻 and symbols ©®™ ~!@#$%^&*()",
    "I'm sure you'll see they've done it, we'd say.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_text_tokenizer(tiny_checkpoint("0.6b-custom_voice"))


@pytest.fixture(scope="module")
def reference():
    specials = {content: i for i, content, _ in ADDED_TOKENS}
    return tiktoken.Encoding("qwen2", pat_str=QWEN2_SPLIT_REGEX, mergeable_ranks=load_ranks(tiktoken_path()), special_tokens=specials)


@pytest.mark.parametrize("text", CORPUS)
def test_matches_tiktoken(tokenizer, reference, text):
    wrapped = f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(wrapped, add_special_tokens=False)["input_ids"] == reference.encode(wrapped, allowed_special="all")


def test_special_tokens_have_released_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>"])
    assert ids == [151644, 151645, 151671, 151672, 151673]
    assert tokenizer("assistant\n", add_special_tokens=False)["input_ids"] == [77091, 198]
    assert tokenizer("user", add_special_tokens=False)["input_ids"] == [872]


@pytest.mark.parity
def test_matches_official_processor(tokenizer, official):
    processor = official("0.6b-custom_voice").processor
    for text in CORPUS:
        wrapped = f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"
        assert processor(text=wrapped)["input_ids"][0] == tokenizer(wrapped, add_special_tokens=False)["input_ids"]

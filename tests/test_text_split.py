"""Sentence splitting of speech input: where texts are cut, and streaming gives the same pieces."""

from __future__ import annotations

import random
import re

import pytest

from vllm_qwen3tts.server.text_split import IncrementalSplitter, split_sentences


def stream(fragments: list[str], **kw) -> list[list[str]]:
    """What each feed returns, then what flush returns."""
    splitter = IncrementalSplitter(**kw)
    return [splitter.feed(f) for f in fragments] + [splitter.flush()]


def non_ws(text: str) -> str:
    return "".join(text.split())


# --- Latin sentence ends ---------------------------------------------------------------------

def test_english_sentences_end_at_final_marks_followed_by_space():
    assert split_sentences("Hello world. How are you today? I am fine! Thanks for asking.") == [
        "Hello world.", "How are you today?", "I am fine!", "Thanks for asking."]


def test_no_end_without_following_whitespace():
    assert split_sentences("It costs $5.99 today.Really.") == ["It costs $5.99 today.Really."]


def test_empty_and_whitespace_only_input_give_nothing():
    assert split_sentences("") == []
    assert split_sentences(" \t\n\r\n\u3000\u00a0 ") == []


def test_whitespace_is_collapsed_and_stripped():
    assert split_sentences("  Hello \t  big\u00a0world.   Next\u3000one.  ") == ["Hello big world.", "Next one."]


def test_repeated_and_mixed_marks_stay_together():
    assert split_sentences("Really?! Yes!!! Okay... Fine?") == ["Really?!", "Yes!!!", "Okay...", "Fine?"]


@pytest.mark.parametrize("text", [
    "Pi is about 3.14159 and e is 2.71828 in value.",
    "Version 2.0.1 of the library shipped on 2024.01.15 at last.",
    "The total was 1,234,567.89 dollars, paid at 12:30 sharp.",
])
def test_numbers_with_dots_commas_and_colons_are_not_boundaries(text):
    assert split_sentences(text) == [text]


def test_a_number_before_a_period_does_end_a_sentence():
    assert split_sentences("He was born in 1990. She was born in 1992.") == [
        "He was born in 1990.", "She was born in 1992."]


@pytest.mark.parametrize("abbreviation", ["Mr.", "Mrs.", "Ms.", "Dr.", "Prof.", "St.", "vs.", "e.g.", "i.e.",
                                          "U.S.", "U.K.", "a.m.", "p.m.", "Ph.D.", "etc.", "approx.", "Jan.", "J."])
def test_abbreviations_do_not_end_sentences(abbreviation):
    text = f"We met {abbreviation} Someone else was there too. Then we left."
    assert split_sentences(text) == [f"We met {abbreviation} Someone else was there too.", "Then we left."]


def test_title_abbreviations_before_names():
    assert split_sentences("Mr. and Mrs. Smith met Dr. J. R. Watson at 5 p.m. yesterday. It rained.") == [
        "Mr. and Mrs. Smith met Dr. J. R. Watson at 5 p.m. yesterday.", "It rained."]


def test_a_one_word_no_is_a_sentence():
    assert split_sentences("No. I will not do that again.", min_chars=0) == ["No.", "I will not do that again."]


# --- quotes, brackets, ellipses --------------------------------------------------------------

def test_closing_quotes_and_brackets_stay_with_their_sentence():
    assert split_sentences('He said "I am done." Then he left. (It was late.) Nobody noticed.') == [
        'He said "I am done."', "Then he left.", "(It was late.)", "Nobody noticed."]


def test_dialogue_tag_after_a_quoted_exclamation_continues_the_sentence():
    assert split_sentences('"Stop right there!" he shouted. "Why?" she asked.') == [
        '"Stop right there!" he shouted.', '"Why?" she asked.']


def test_ellipsis_before_a_lowercase_word_is_a_pause():
    assert split_sentences("I was thinking... maybe we should go. He paused... Then he left.") == [
        "I was thinking... maybe we should go.", "He paused...", "Then he left."]


def test_ellipsis_inside_a_quotation_is_a_pause():
    assert split_sentences('"Well… I don\'t know," he said. “Maybe... Tomorrow,” she said.') == [
        '"Well… I don\'t know," he said.', "“Maybe... Tomorrow,” she said."]


def test_ellipsis_closing_a_quotation_ends_the_sentence():
    assert split_sentences('She whispered "I wonder..." Then she fell asleep.') == [
        'She whispered "I wonder..."', "Then she fell asleep."]


# --- CJK ------------------------------------------------------------------------------------

def test_chinese_sentences_need_no_space():
    assert split_sentences("今天天气很好。我们去公园散步吧！你觉得怎么样？好主意；走吧。") == [
        "今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？", "好主意；", "走吧。"]


def test_japanese_sentences():
    assert split_sentences("こんにちは。今日はいい天気ですね！散歩に行きましょうか？") == [
        "こんにちは。", "今日はいい天気ですね！", "散歩に行きましょうか？"]


def test_cjk_closing_brackets_stay_with_the_sentence():
    assert split_sentences("他说：「你好。」然后走了。她问：『真的吗？！』我说是的。") == [
        "他说：「你好。」", "然后走了。", "她问：『真的吗？！』", "我说是的。"]


def test_cjk_decimals_and_latin_words_are_not_split():
    assert split_sentences("圆周率约等于3.14。我用Python 3.12写代码。") == ["圆周率约等于3.14。", "我用Python 3.12写代码。"]


def test_ascii_marks_in_chinese_text_end_sentences_before_cjk_letters():
    assert split_sentences("真的吗?我不信!你呢") == ["真的吗?", "我不信!", "你呢"]


def test_mixed_english_chinese_japanese():
    assert split_sentences("Hello world! 你好，世界。This is a test. これはテストです。") == [
        "Hello world!", "你好，世界。", "This is a test.", "これはテストです。"]


def test_korean_uses_latin_punctuation_with_spaces():
    assert split_sentences("안녕하세요. 만나서 반갑습니다! 잘 지내세요?") == ["안녕하세요.", "만나서 반갑습니다!", "잘 지내세요?"]


# --- newlines -------------------------------------------------------------------------------

def test_line_breaks_end_sentences_even_without_punctuation():
    assert split_sentences("Shopping list\nFresh apples\r\nWhole milk\n\nThat is all for today.") == [
        "Shopping list", "Fresh apples", "Whole milk", "That is all for today."]


def test_short_sentence_merges_across_a_line_break_only_after_a_final_mark():
    assert split_sentences("Hi.\nHow are you?") == ["Hi. How are you?"]
    assert split_sentences("Hi\nHow are you?") == ["Hi", "How are you?"]


def test_short_sentence_never_merges_across_a_paragraph_break():
    assert split_sentences("Hi.\n\nHow are you?") == ["Hi.", "How are you?"]


def test_cjk_lines_merge_without_a_space():
    assert split_sentences("好。\n我们走吧。") == ["好。我们走吧。"]


def test_an_unclosed_quotation_ends_with_its_line():
    assert split_sentences('He said "wait\nWell... Then it ended.') == ['He said "wait', "Well...", "Then it ended."]


def test_line_break_ends_a_sentence_after_an_abbreviation():
    assert split_sentences("Call Dr.\nSmith is waiting.") == ["Call Dr.", "Smith is waiting."]


# --- merging short pieces --------------------------------------------------------------------

def test_short_pieces_merge_with_the_following_sentences():
    assert split_sentences("Hi. How are you doing today?") == ["Hi. How are you doing today?"]
    assert split_sentences("好。我们走吧。") == ["好。我们走吧。"]
    # Merging goes on while the merged piece is still short.
    assert split_sentences("Hi. OK. Yes. How are you doing today? Fine.", min_chars=20) == [
        "Hi. OK. Yes. How are you doing today?", "Fine."]


def test_a_short_last_piece_stays_alone():
    assert split_sentences("This is a complete sentence. Ok.") == ["This is a complete sentence.", "Ok."]


def test_pieces_without_letters_merge_forward():
    assert split_sentences("Great job! 🎉 We did it. ... And then?") == ["Great job!", "🎉 We did it.", "... And then?"]


def test_merging_respects_max_chars():
    assert split_sentences("Hi. How are you doing today?", max_chars=25) == ["Hi.", "How are you doing today?"]


def test_min_chars_zero_disables_merging():
    assert split_sentences("Hi. Yo. 好。", min_chars=0) == ["Hi.", "Yo.", "好。"]


def test_min_chars_counts_cjk_characters_double():
    assert split_sentences("你好。再见。", min_chars=6) == ["你好。", "再见。"]
    assert split_sentences("你好。再见。", min_chars=7) == ["你好。再见。"]


# --- long sentences --------------------------------------------------------------------------

def test_long_sentence_without_punctuation_is_cut_at_spaces():
    words = [f"word{i}" for i in range(200)]
    pieces = split_sentences(" ".join(words), max_chars=60)
    assert all(len(p) <= 60 for p in pieces)
    assert " ".join(pieces).split() == words  # no word cut in two
    assert all(len(p) > 50 for p in pieces[:-1])  # greedy: each piece nearly full


def test_long_sentence_is_cut_after_clause_marks_first():
    text = ("The committee reviewed the proposal in detail, discussed the budget at length; "
            "then it voted on every amendment: all of them passed without any objection at all.")
    assert split_sentences(text, max_chars=90) == [
        "The committee reviewed the proposal in detail, discussed the budget at length;",
        "then it voted on every amendment: all of them passed without any objection at all."]


def test_an_early_clause_mark_does_not_make_a_tiny_piece():
    text = "Well, " + " ".join(["lorem"] * 30)
    pieces = split_sentences(text, max_chars=60)
    assert pieces[0].startswith("Well, lorem") and len(pieces[0]) > 50


def test_long_chinese_sentence_is_cut_after_commas_then_at_the_hard_limit():
    text = "我们" * 40 + "，" + "大家" * 100 + "。"
    pieces = split_sentences(text, max_chars=100)
    assert pieces[0] == "我们" * 40 + "，"
    assert [len(p) for p in pieces[1:]] == [100, 99, 2]  # no piece starts with "。"
    assert "".join(pieces) == text


def test_hard_cut_never_splits_a_latin_word_or_an_emoji_sequence_in_cjk_text():
    family = "👨\u200d👩\u200d👧"
    text = ("中" * 8 + "Python" + family + "🇯🇵") * 6
    pieces = split_sentences(text, max_chars=10, min_chars=0)
    assert "".join(pieces) == text
    for piece in pieces:
        assert "Python" in piece or not re.search("[A-Za-z]", piece)
        assert piece.count("\u200d") in (0, 2)  # the family emoji whole
        assert piece.count("🇯🇵") * 2 == len(re.findall("[\U0001F1E6-\U0001F1FF]", piece))  # the flag whole


def test_a_word_longer_than_max_chars_is_kept_whole():
    url = "https://example.com/" + "a" * 100 + "?q=1.5"
    assert split_sentences(f"See {url} for details. Thanks a lot.", max_chars=40) == [
        "See", url, "for details.", "Thanks a lot."]


def test_urls_and_emails_are_not_split():
    text = "Visit https://www.example.com/path/file.html?x=1.5&y=2 or mail jane.doe@example.org today. Bye now."
    assert split_sentences(text) == [
        "Visit https://www.example.com/path/file.html?x=1.5&y=2 or mail jane.doe@example.org today.", "Bye now."]


def test_emoji_after_a_final_mark_stays_with_the_sentence():
    assert split_sentences("We won!🎉🎉 Let's celebrate tonight. 太好了！😀大家都来。") == [
        "We won!🎉🎉", "Let's celebrate tonight.", "太好了！😀", "大家都来。"]


def test_max_chars_must_be_positive():
    with pytest.raises(ValueError):
        IncrementalSplitter(max_chars=0)
    with pytest.raises(ValueError):
        IncrementalSplitter(min_chars=-1)


# --- streaming -------------------------------------------------------------------------------

def test_stream_emits_a_latin_sentence_as_soon_as_the_space_arrives():
    assert stream(["Hello world.", " ", "Next"]) == [[], ["Hello world."], [], ["Next"]]


def test_stream_emits_a_cjk_sentence_at_its_final_mark():
    assert stream(["你好。", "我"]) == [["你好。"], [], ["我"]]
    assert stream(["太好了！", "我"]) == [[], ["太好了！"], ["我"]]  # "！？" might follow


def test_stream_waits_for_the_closing_bracket_inside_a_quotation():
    assert stream(["他说：「你好。", "」", "然后"]) == [[], ["他说：「你好。」"], [], ["然后"]]


def test_stream_emits_at_a_line_break():
    assert stream(["First line", "\n", "second"]) == [[], ["First line"], [], ["second"]]


def test_stream_waits_for_the_next_word_after_an_ellipsis_or_a_closing_quote():
    assert stream(["He paused... ", "Then", " he left."]) == [[], ["He paused..."], [], ["Then he left."]]
    assert stream(["Wait... ", "t", "he end. "]) == [[], [], ["Wait... the end."], []]
    assert stream(['He said "Go." ', "She went."]) == [[], ['He said "Go."'], ["She went."]]


def test_stream_holds_a_short_piece_until_it_can_be_merged():
    assert stream(["Hi. ", "How are you? ", "Fine."]) == [[], ["Hi. How are you?"], [], ["Fine."]]


def test_stream_holds_an_abbreviation():
    assert stream(["Dr. ", "Smith arrived. "]) == [[], ["Dr. Smith arrived."], []]


def test_stream_emits_a_long_sentence_piece_by_piece_before_it_ends():
    splitter = IncrementalSplitter(max_chars=40)
    emitted = [p for _ in range(20) for p in splitter.feed("lorem ipsum ")]
    assert len(emitted) >= 5 and all(len(p) <= 40 for p in emitted)


def test_carriage_return_line_feed_split_across_fragments_is_one_line_break():
    assert stream(["Hi.\r", "\nHow are you?"]) == [[], [], ["Hi. How are you?"]]


def test_splitter_is_reusable_after_flush():
    splitter = IncrementalSplitter()
    assert splitter.feed("Hello there. Unfinished") == ["Hello there."]
    assert splitter.flush() == ["Unfinished"]
    assert splitter.feed("Another text") == []
    assert splitter.flush() == ["Another text"]


# --- properties on generated text ------------------------------------------------------------

_TOKENS = (
    ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then", "it", "was", "maybe"] * 4
    + ["Hello", "World", "Then", "She", "It", "I", "Python", "OK", "Hi"] * 2
    + [".", ".", ".", "!", "?", "...", "…", "?!", ",", ",", ";", ":", "-", "—"] * 3
    + ["Mr.", "Dr.", "e.g.", "U.S.", "etc.", "J.", "No.", "3.14", "1,000", "$5.99", "12:30", "2024"]
    + ["https://example.com/a.b?x=1", "jane.doe@example.org", "supercalifragilisticexpialidocious" * 2]
    + ["🎉", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "😀"]
    + ["你好", "世界", "今天", "天气", "很好", "我们", "こんにちは", "カタカナ", "한국어", "中文" * 20]
    + ["。", "。", "！", "？", "；", "，", "、", "：", "……"] * 2
    + ['"', '"', "“", "”", "「", "」", "『", "』", "(", ")", "'", "’"]
)
_SEPARATORS = [" "] * 12 + ["", "", "", "  ", "\n", "\n\n", "\r\n", "\t", "\u3000", "\u00a0", " \n "]


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randrange(0, 90)):
        parts.append(rng.choice(_TOKENS))
        parts.append(rng.choice(_SEPARATORS))
    return "".join(parts)


def fragmentations(text: str, rng: random.Random) -> list[list[str]]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(1, 12)
        chunks.append(text[i:i + n])
        i += n
    return [list(text), re.findall(r"\S+|\s+", text), chunks, [text[: len(text) // 2], text[len(text) // 2:]]]


CORPUS = [random_text(random.Random(seed)) for seed in range(250)] + [
    "Hello world. How are you?", "你好。我是小明。", 'He said "Hi." Then left.', "Wait... what? No!", "a" * 500,
]


@pytest.mark.parametrize("max_chars,min_chars", [(300, 6), (40, 6), (12, 0), (25, 20)])
def test_pieces_keep_every_non_whitespace_character_in_order(max_chars, min_chars):
    for text in CORPUS:
        pieces = split_sentences(text, max_chars=max_chars, min_chars=min_chars)
        assert non_ws(" ".join(pieces)) == non_ws(text), text
        assert non_ws("".join(pieces)) == non_ws(text), text


@pytest.mark.parametrize("max_chars,min_chars", [(300, 6), (40, 6), (12, 0), (25, 20)])
def test_pieces_are_normalized_and_within_max_chars_unless_one_unbreakable_word(max_chars, min_chars):
    for text in CORPUS:
        for piece in split_sentences(text, max_chars=max_chars, min_chars=min_chars):
            assert piece and piece == piece.strip() and not re.search(r"\s\s|[^\S ]", piece), (text, piece)
            assert len(piece) <= max_chars or " " not in piece, (text, piece)


@pytest.mark.parametrize("max_chars,min_chars", [(300, 6), (40, 6), (12, 0), (25, 20)])
def test_any_fragmentation_streams_exactly_the_pieces_of_the_whole_text(max_chars, min_chars):
    rng = random.Random(max_chars)
    for text in CORPUS:
        expected = split_sentences(text, max_chars=max_chars, min_chars=min_chars)
        for fragments in fragmentations(text, rng):
            got = [p for batch in stream(fragments, max_chars=max_chars, min_chars=min_chars) for p in batch]
            assert got == expected, (text, fragments)


def test_stream_holds_back_nothing_complete_after_plain_sentences():
    rng = random.Random(7)
    sentences = [f"Sentence number {i} says {rng.choice(['hello', 'goodbye', 'maybe'])}." for i in range(30)]
    splitter = IncrementalSplitter()
    for s in sentences:
        assert splitter.feed(s + " ") == [s]
    assert splitter.flush() == []


def test_splitting_a_piece_again_gives_the_piece_for_text_without_quotes():
    rng = random.Random(3)
    for _ in range(150):
        text = re.sub("[\"“”「」『』()'’]", "", random_text(rng))
        for max_chars in (300, 40):
            for piece in split_sentences(text, max_chars=max_chars):
                assert split_sentences(piece, max_chars=max_chars) == [piece], (text, piece)


# --- a long token-mode utterance, cut into requests (server.service.UtteranceText) -------------

@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from vllm_qwen3tts.model.text_tokenizer import load_text_tokenizer

    return load_text_tokenizer(tiny_checkpoint("0.6b-custom_voice"))


def requests_of(tokenizer, pieces: list[str], frames: int, taken: int | None = None) -> list[str]:
    """The texts of the requests that speak an utterance sent as `pieces`, each request able to
    make `frames` frames; with `taken`, each request ends by itself after taking that many pieces."""
    import asyncio

    from vllm_qwen3tts.server.service import TextCuts, UtteranceText

    async def run() -> list[str]:
        queue: asyncio.Queue = asyncio.Queue()
        for piece in [*pieces, None]:
            queue.put_nowait(piece)
        utterance, texts = UtteranceText(queue.get, tokenizer), []
        while (first := await utterance.next_start()) is not None:
            request = utterance.pieces(first, TextCuts.for_frames(frames))
            texts.append("".join([piece async for piece in request] if taken is None else
                                 [await anext(request) for _ in range(taken)]))
            await request.aclose()
        assert utterance.text == "".join(pieces)
        return texts

    return asyncio.run(run())


def test_a_long_utterance_goes_on_in_new_requests_at_sentence_ends_losing_no_text_however_it_is_cut(tokenizer):
    text = " ".join(f"Point {i} is made here." for i in range(12)) + " 你好。我们走吧！ The end."
    rng = random.Random(5)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 150)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        texts = requests_of(tokenizer, pieces, frames=60)  # from 12 tokens on, the next sentence end
        assert non_ws("".join(texts)) == non_ws(text), texts
        assert 1 < len(texts) < 14 and all(t.rstrip()[-1] in ".。！" for t in texts), texts  # sentences, grouped
    assert requests_of(tokenizer, [text], frames=10_000) == [text]  # within one request's reach: one request


def test_without_a_sentence_end_a_long_utterance_is_cut_between_words(tokenizer):
    words = " ".join(f"w{i}" for i in range(150))
    texts = requests_of(tokenizer, [words[i:i + 3] for i in range(0, len(words), 3)], frames=40)
    assert " ".join(texts).split() == words.split() and len(texts) > 2, texts
    assert all(len(tokenizer(t)["input_ids"]) <= 20 for t in texts), texts  # half the frames at most


def test_a_request_that_ends_by_itself_leaves_the_text_it_did_not_take_to_the_next(tokenizer):
    assert requests_of(tokenizer, ["one two three four", " five six"], frames=1000, taken=2) == [
        "one two", "three four", "five six"]

"""Sentence splitting of speech input: whole texts (`split_sentences`) and text that arrives in
fragments, e.g. an LLM's tokens over a WebSocket (`IncrementalSplitter`).

Qwen3-TTS synthesizes one utterance per request, so long input is cut into pieces that the server
speaks in order with the same voice. The rules, in the order they apply:

1. Whitespace: every run collapses to one space; a run holding a line break is a sentence boundary
   ("line"), one holding two or more is a paragraph boundary ("paragraph").
2. Sentence ends. Latin: a run of ``. ! ? …`` plus any closing quotes/brackets/emoji, followed by
   whitespace (or the end of the text). Not an end: a "." after a known abbreviation ("Mr.", "e.g.",
   "U.S.", an initial "J."); a "." inside a token ("3.14", "example.com"); an ellipsis, or a mark
   followed by a closing quote, when the next word starts lowercase ("I think... maybe",
   '"Stop!" he said'); an ellipsis inside an open quotation or bracket ('"Well... I don't know,"').
   "!"/"?" also end a sentence right before a CJK letter ("你好!我"). CJK: ``。 ； ｡`` end a
   sentence on the spot (inside an open 「quotation」 the closing marks stay with it);
   ``！ ？`` end one whatever follows (a run such as "？！" and closing brackets stay with it).
3. A sentence longer than `max_chars` is cut greedily: after the last clause mark (``, ; : 、 ， ； ：``)
   that keeps at least half of `max_chars`; else at the last space (or, in CJK text, the last point
   between characters) within `max_chars`; never inside a Latin word, a number, a URL or an emoji
   sequence. A single word longer than `max_chars` is kept whole, so such a piece may exceed the limit.
4. A piece narrower than `min_chars` display columns (CJK characters count two, so "你好。" weighs
   like "Hello.") or with no letter or digit (a lone emoji) is merged with the pieces after it, as long
   as the result fits in `max_chars`, the boundary between them is no paragraph break, and a line
   break is crossed only after a sentence-final mark. Merging is forward only: a short last piece
   stays alone.

Pieces are joined with the whitespace that separated them ("" between CJK sentences), so joining
the result with spaces loses no non-whitespace character and keeps their order.

Streaming is exact: `IncrementalSplitter` runs the same left-to-right scan, deciding a boundary only
once the characters that decide it have arrived, so every fragmentation of a text yields exactly
`split_sentences(text)`. A sentence is emitted as soon as it is certainly complete ("Hello world. "
after the space, "你好。" at the "。"); what waits is a sentence whose end depends on the next word
(an ellipsis, a closing quote), a piece short enough to be merged, and a long sentence's text up to
the next cut point.
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

__all__ = ["DEFAULT_MAX_CHARS", "DEFAULT_MIN_CHARS", "IncrementalSplitter", "first_cut", "split_sentences"]

DEFAULT_MAX_CHARS = 300
# In display columns: merges "Hi." / "OK." / "Yes." / "好。", keeps "Hello." and "你好。" alone.
DEFAULT_MIN_CHARS = 6

# Every whitespace run. Python's \s also covers NBSP, U+3000 (ideographic space) and the Unicode
# line/paragraph separators, which should collapse like ASCII blanks.
_WS_RUN = re.compile(r"\s+")
# Line breaks inside a run, as str.splitlines() sees them; "\r\n" is one break, not a paragraph.
_LINE_BREAK = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")

# Sentence-end candidates in whitespace-normalized text: a run of final marks, or a line break.
# A run stops at 。 ； ｡ : they never combine with a following mark, so "你好。" is complete the moment
# "。" arrives (a following "。" starts a new run). Other marks combine: "?!", "...", "！？", "？。".
_CANDIDATE = re.compile(r"[.!?…！？]+[。；｡]?|[。；｡]|\n")
# Where a candidate may start; a plain character class is searched several times faster than
# _CANDIDATE's alternation, which matters while a long unpunctuated text streams in.
_CANDIDATE_START = re.compile(r"[.!?…！？。；｡\n]")
_STOP_ON_THE_SPOT = "。；｡"
_FULL_WIDTH_STOPS = "！？"
_FINAL_MARKS = ".!?…。；｡！？"

_OPENERS = "([{«‹“「『（【〔〈《〖〘〚｢"
_CLOSERS = ")]}»›”」』）】〕〉》〗〙〛｣"
# The characters that open or close a quotation/bracket (ASCII " toggles). ‘ ’ and ' are left out:
# ’ and ' are mostly apostrophes ("don't").
_QUOTE_CHARS = re.compile("[" + re.escape(_OPENERS + _CLOSERS) + '"]')

# Clause marks a long sentence may be cut after; the ASCII ones only when a space follows, so
# "1,000", "12:30" and "http://" stay whole.
_CLAUSE_MARK = re.compile(r"[、，；：]|[,;:](?= )")
# Characters next to which a long sentence may be cut (see _can_cut): a space, or anything non-ASCII
# (CJK characters are all non-ASCII). Runs of printable ASCII are words, numbers, URLs.
_MAYBE_CUT = re.compile(r"[^\x21-\x7e]")

# Words that end with "." without ending the sentence. Ambiguous ones lean towards "abbreviation":
# an unsplit sentence pair costs nothing, a split "Dr." / "Smith" breaks the prosody. "No." is left
# out (a common one-word answer).
_ABBREVIATIONS = frozenset("""
    mr mrs ms mx dr prof sr jr st mt ft gen col capt cpt lt sgt rev hon gov pres sen rep supt
    vs etc approx dept est fig figs eq vol vols ch pp p ref inc ltd co corp
    jan feb apr jun jul aug sep sept oct nov dec mon tue tues thu thur thurs fri ave blvd rd
""".split())
# Dotted abbreviations: "e.g.", "i.e.", "U.S.", "a.m.", "Ph.D.".
_DOTTED = re.compile(r"(?:[A-Za-z]{1,2}\.){2,}")
# An initial: "J. K. Rowling".
_INITIAL = re.compile(r"[A-Z]\.")

# Gaps: the whitespace between two pieces.
_NO_GAP, _SPACE, _LINE, _PARAGRAPH = 0, 1, 2, 3

# Verdicts on a sentence-end candidate besides "ends at index k".
_NOT_AN_END = -1
_NEED_MORE = -2


class _Quotes(NamedTuple):
    """Open quotations/brackets on the current line."""

    depth: int = 0  # open brackets and typographic quotes
    straight: bool = False  # an ASCII " is open

    @property
    def open(self) -> bool:
        return self.depth > 0 or self.straight


def _canonical_run(m: re.Match) -> str:
    breaks = len(_LINE_BREAK.findall(m.group()))
    return "\n\n" if breaks >= 2 else "\n" if breaks else " "


def _canonical_ws(text: str) -> str:
    """Each whitespace run as " ", "\\n" or "\\n\\n"; canonical(canonical(a) + b) == canonical(a + b)."""
    return _WS_RUN.sub(_canonical_run, text)


def _gap_of(run: str) -> int:
    if not run:
        return _NO_GAP
    return {"\n": _LINE, "\n\n": _PARAGRAPH}.get(run, _SPACE)


def _is_wide(c: str) -> bool:
    return unicodedata.east_asian_width(c) in "WF"


def _width(text: str) -> int:
    """Display columns: CJK characters (and most emoji) take two."""
    return sum(2 if _is_wide(c) else 1 for c in text)


def _is_cjk_letter(c: str) -> bool:
    return _is_wide(c) and unicodedata.category(c).startswith("L")


def _is_emoji_part(c: str) -> bool:
    o = ord(c)
    return (unicodedata.category(c) == "So" or c in "\u200d\ufe0f"
            or 0x1F3FB <= o <= 0x1F3FF or 0xE0020 <= o <= 0xE007F)  # skin tones, flag tags


def _advance(quotes: _Quotes, text: str, start: int, end: int) -> _Quotes:
    """The quotation state after text[start:end]."""
    depth, straight = quotes
    for m in _QUOTE_CHARS.finditer(text, start, end):
        c = m.group()
        if c == '"':
            straight = not straight
        elif c in _OPENERS:
            depth += 1
        elif depth:
            depth -= 1
    return _Quotes(depth, straight)


def _take_closers(text: str, k: int, quotes: _Quotes, while_open: bool) -> tuple[int, _Quotes]:
    """Index past the closing quotes/brackets (and emoji) that follow a final mark at text[k-1];
    with `while_open`, only as long as a quotation is open."""
    while k < len(text) and (quotes.open or not while_open):
        c = text[k]
        if c == '"':  # right after a final mark an ASCII quote closes, whatever the count says
            quotes = quotes._replace(straight=False)
        elif c in _CLOSERS:
            quotes = quotes._replace(depth=max(0, quotes.depth - 1))
        elif not (c in "'’" or _is_emoji_part(c)):
            break
        k += 1
    return k, quotes


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the "." at text[dot] ends an abbreviation rather than a sentence."""
    start = dot
    # The word is the run of ASCII letters and dots before the "." ("U.S.", "e.g.", "Mr.").
    while start > 0 and (text[start - 1] == "." or (text[start - 1].isascii() and text[start - 1].isalpha())):
        start -= 1
    word = text[start:dot + 1]
    return (word[:-1].lower() in _ABBREVIATIONS or _DOTTED.fullmatch(word) is not None
            or _INITIAL.fullmatch(word) is not None)


def _latin_verdict(text: str, m: re.Match, k: int, quotes: _Quotes, final: bool) -> int:
    """A run of Latin final marks m, its closers up to k, and whitespace at text[k]."""
    run = m.group()
    if text[k] == "\n":  # a line break ends the sentence anyway
        return k
    if run == "." and k == m.end() and _is_abbreviation(text, m.start()):
        return _NOT_AN_END
    ellipsis = ("…" in run or ".." in run) and not any(c in "!?" for c in run)
    if k == m.end() and not ellipsis:
        return k  # "Hello world. ": certainly complete, the next word cannot change it
    # An ellipsis or a closing quote: the next word decides ('"Stop!" he said', "I think... maybe").
    if k + 1 == len(text):
        return k if final else _NEED_MORE
    if text[k + 1].islower():
        return _NOT_AN_END
    if ellipsis and quotes.open:
        return _NOT_AN_END  # a pause inside a quotation: '"Well... I don't know," he said.'
    return k


def _verdict(text: str, m: re.Match, quotes: _Quotes, final: bool) -> int:
    """Where the sentence ends if the run of final marks m ends it, _NOT_AN_END, or _NEED_MORE."""
    run = m.group()
    if run[-1] in _STOP_ON_THE_SPOT:
        if not quotes.open:
            return m.end()
        k, after = _take_closers(text, m.end(), quotes, while_open=True)  # 「你好。」
        return _NEED_MORE if k == len(text) and after.open and not final else k
    k, after = _take_closers(text, m.end(), quotes, while_open=False)
    if k == len(text):
        return k if final else _NEED_MORE
    if any(c in _FULL_WIDTH_STOPS for c in run):
        return k
    if text[k] in " \n":
        return _latin_verdict(text, m, k, after, final)
    if any(c in "!?" for c in run) and _is_cjk_letter(text[k]):
        return k  # "你好!我是"
    return _NOT_AN_END  # "3.14", "example.com", "Yahoo!Japan"


def _find_end(text: str, quotes: _Quotes, final: bool) -> tuple[int | None, int]:
    """The end of the sentence that starts text (whitespace-normalized, not starting with a space).

    Returns (end, known): `end` is the index past the sentence and its closers, or None while it is
    undecided; then `known` is a lower bound on its length.
    """
    pos = scanned = 0
    while start := _CANDIDATE_START.search(text, scanned):
        m = _CANDIDATE.match(text, start.start())
        scanned = m.end()
        quotes = _advance(quotes, text, pos, m.start())
        pos = m.start()
        if m.group() == "\n":
            return m.start(), m.start()
        k = _verdict(text, m, quotes, final)
        if k == _NEED_MORE:
            return None, m.end()
        if k != _NOT_AN_END:
            return k, k
    if final:
        return len(text), len(text)
    return None, len(text.rstrip())


def _can_cut(s: str, p: int) -> bool:
    """Whether a piece may end at s[:p] (0 < p < len(s)) when a long sentence has no better place."""
    a, b = s[p - 1], s[p]
    if b == " ":
        return True
    if not (_is_wide(a) or _is_wide(b)):
        return False  # inside a Latin word, a number, a URL
    cat_a, cat_b = unicodedata.category(a), unicodedata.category(b)
    if cat_b[0] == "M" or cat_b in ("Pe", "Pf", "Po", "Pd", "Sk") or b == "\u200d" or 0xE0020 <= ord(b) <= 0xE007F:
        return False  # before closing punctuation or a combining mark / emoji modifier
    if cat_a in ("Ps", "Pi") or a == "\u200d":
        return False  # after an opening bracket, inside an emoji ZWJ sequence
    regional = 0x1F1E6 <= ord(a) <= 0x1F1FF and 0x1F1E6 <= ord(b) <= 0x1F1FF
    return not regional  # a flag is two regional indicators


def first_cut(text: str, start: int) -> int | None:
    """The first place p >= start (0 < p < len(text)) where `text` may be cut in two when no sentence
    ends in time: before whitespace, or where a long sentence may be cut (rule 3: between CJK
    characters, never inside a Latin word, a number, a URL or an emoji sequence); None: none yet."""
    for p in range(max(start, 1), len(text)):
        if text[p].isspace() or _can_cut(text, p):
            return p
    return None


def _clause_cut(s: str, max_chars: int) -> int | None:
    """Past the last clause mark that leaves a piece of max_chars // 2 .. max_chars characters."""
    lo = max(max_chars // 2, 1) - 1
    marks = [m.end() for m in _CLAUSE_MARK.finditer(s, lo, max_chars + 1) if m.end() <= max_chars]
    return marks[-1] if marks else None


def _cut_candidates(s: str, start: int, end: int) -> list[int]:
    """Positions p in [start, end) where _can_cut might hold: next to a space or a non-ASCII character
    (found by a regex, so a long ASCII word costs no Python loop)."""
    points = []
    for m in _MAYBE_CUT.finditer(s, max(start - 1, 0), end):
        points += [p for p in (m.start(), m.start() + 1) if start <= p < end and (not points or p > points[-1])]
    return points


def _cut(s: str, max_chars: int, complete: bool) -> int | None:
    """Where to end the first piece of s, a sentence (prefix, unless `complete`) over max_chars;
    None when that depends on text not seen yet (a word longer than max_chars)."""
    clause = _clause_cut(s, max_chars)
    if clause is not None:
        return clause
    for p in reversed(_cut_candidates(s, 1, max_chars + 1)):
        if _can_cut(s, p):
            return p
    for p in _cut_candidates(s, max_chars + 1, len(s)):  # one word over the limit: keep it whole
        if _can_cut(s, p):
            return p
    return len(s) if complete else None


def _ends_sentence(piece: str) -> bool:
    return piece.rstrip(_CLOSERS + "\"'’")[-1:] in _FINAL_MARKS


def _joiner(left: str, right: str, gap: int) -> str:
    if gap == _NO_GAP or (gap == _LINE and _is_wide(left[-1]) and _is_wide(right[0])):
        return ""  # CJK sentences run on without spaces
    return " "


class IncrementalSplitter:
    """Splits text that arrives in fragments into the pieces `split_sentences` gives for the whole.

    `feed(fragment)` returns the pieces completed by that fragment; `flush()` returns the rest at the
    end of input and makes the splitter ready for a new text.
    """

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS, min_chars: int = DEFAULT_MIN_CHARS) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars}")
        if min_chars < 0:
            raise ValueError(f"min_chars must be at least 0, got {min_chars}")
        self.max_chars = max_chars
        self.min_chars = min_chars
        self._reset()

    def _reset(self) -> None:
        self._text = ""  # whitespace-normalized text not yet split off
        self._cr = ""  # a trailing "\r" waits: it may be half of "\r\n"
        self._quotes = _Quotes()  # at the start of self._text
        self._gap = _NO_GAP  # before the next piece
        self._held: str | None = None  # a short piece waiting to be merged with the next

    def feed(self, fragment: str) -> list[str]:
        raw = self._cr + fragment
        self._cr = "\r" if raw.endswith("\r") else ""
        # Only the trailing whitespace of the (already normalized) text can change.
        head = self._text.rstrip()
        self._text = head + _canonical_ws(self._text[len(head):] + raw[: len(raw) - len(self._cr)])
        return self._split(final=False)

    def flush(self) -> list[str]:
        self._text = _canonical_ws(self._text + self._cr)
        self._cr = ""
        out = self._split(final=True)
        if self._held is not None:
            out.append(self._held)
        self._reset()
        return out

    def _split(self, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            text = self._text
            body = text.lstrip()
            if not body:
                if final:
                    self._text = ""
                break  # whitespace alone may still grow into a paragraph break
            if len(body) < len(text):
                self._gap = _gap_of(text[: len(text) - len(body)])
                if "\n" in text[: len(text) - len(body)]:
                    self._quotes = _Quotes()  # quotation state is per line
                self._text = text = body
            end, known = _find_end(text, self._quotes, final)
            if end is not None and len(text[:end].rstrip()) <= self.max_chars:
                cut = end
            elif end is not None:
                cut = _cut(text[:end].rstrip(), self.max_chars, complete=True)
            elif known > self.max_chars:
                cut = _cut(text[:known], self.max_chars, complete=False)
            else:
                cut = None
            if cut is None:
                break
            self._quotes = _advance(self._quotes, text, 0, cut)
            self._text = text[cut:]
            out += self._merge(text[:cut].rstrip(), self._gap)
            self._gap = _NO_GAP
        return out

    def _is_short(self, piece: str) -> bool:
        return _width(piece) < self.min_chars or not any(c.isalnum() for c in piece)

    def _merge(self, piece: str, gap: int) -> list[str]:
        out = []
        if self._held is not None:
            held, self._held = self._held, None
            joined = held + _joiner(held, piece, gap) + piece
            crossable = gap != _PARAGRAPH and (gap != _LINE or _ends_sentence(held))
            if crossable and len(joined) <= self.max_chars:
                piece = joined
            else:
                out.append(held)
        if self._is_short(piece):
            self._held = piece
        else:
            out.append(piece)
        return out


def split_sentences(text: str, max_chars: int = DEFAULT_MAX_CHARS, min_chars: int = DEFAULT_MIN_CHARS) -> list[str]:
    """Pieces of `text` to synthesize one by one, at most `max_chars` long (see the module docstring)."""
    splitter = IncrementalSplitter(max_chars, min_chars)
    return splitter.feed(text) + splitter.flush()

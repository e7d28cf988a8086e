"""The text tokens of an utterance whose text arrives in pieces (an LLM's answer as it is written).

In streaming text mode the talker takes one text token per frame, so a request can start speaking
before its text is complete. Each token is committed only once no later text can change it, so the
tokens never depend on where the pieces were cut: they are exactly `prompt.target_text_ids` of the
whole text.

Why a token can be final: the Qwen2 tokenizer first splits the text into pre-tokens with a regex
(`text_tokenizer.QWEN2_SPLIT_REGEX`), then merges BPE tokens inside each pre-token. Appending text
can change only the last pre-token of the text so far (it may grow, or split, as trailing spaces
do before a word), never one before it: each of those ended at a character that is already there,
and the regex looks one character ahead at most and never behind. So every token before the last
pre-token is final. A consequence: a run of letters with no space or punctuation (a CJK sentence
before its first comma) is one pre-token, committed only once something else follows it.
"""

from __future__ import annotations

from .prompt import ROLE_PREFIX, PromptError


class IncrementalTokenizer:
    """Append text pieces; get back the tokens they made final. `close()` ends the text and
    returns the rest. `ids` holds every committed token, in order."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._pre_tokenize = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str
        # The text is tokenized as the prompt has it, after the role's "assistant\n" (whose two
        # tokens are dropped): a newline that starts the text may merge with the role's.
        self._context = ROLE_PREFIX
        self._final_chars = 0  # self._context[:self._final_chars] is tokenized for good
        self._role_tokens_left = 2
        # <|im_start|> and the two tokens dropped: the prompt's role tokens (`build_prompt(tokens=...)`)
        self.role_ids: list[int] = [tokenizer.convert_tokens_to_ids("<|im_start|>")]
        self.ids: list[int] = []
        self.closed = False

    @property
    def text(self) -> str:
        return self._context[len(ROLE_PREFIX):]

    def append(self, piece: str) -> list[int]:
        """Add `piece` to the text; the tokens that are final now (often none)."""
        if self.closed:
            raise PromptError("text was appended after the input was closed")
        if not piece:
            return []
        self._context += piece
        tail = self._context[self._final_chars:]
        pre_tokens = self._pre_tokenize(tail)
        if len(pre_tokens) < 2:
            return []
        return self._commit(tail, final_chars=pre_tokens[-1][1][0])  # all but the last pre-token

    def close(self) -> list[int]:
        """The text is complete: its remaining tokens. Raises PromptError if it has none at all."""
        if self.closed:
            return []
        self.closed = True
        tail = self._context[self._final_chars:]
        new = self._commit(tail, final_chars=len(tail))
        if not self.ids:
            raise PromptError("input text produced no tokens")
        return new

    def _commit(self, tail: str, final_chars: int) -> list[int]:
        """Commit the tokens of `tail` (the text after the last commit) that lie within its first
        `final_chars` characters. The whole tail is tokenized, not those characters alone: cut
        there, the last of them could be split otherwise ("  " before a digit is two pre-tokens,
        alone it is one)."""
        if final_chars <= 0:
            return []
        encoded = self._tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)
        ids = [i for i, (_, end) in zip(encoded["input_ids"], encoded["offset_mapping"]) if end <= final_chars]
        self._final_chars += final_chars
        skip = min(self._role_tokens_left, len(ids))
        self._role_tokens_left -= skip
        self.role_ids.extend(ids[:skip])
        new = ids[skip:]
        self.ids.extend(new)
        return new

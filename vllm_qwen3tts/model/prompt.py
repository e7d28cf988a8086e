"""The talker's prefill layout and decode-step text track, as plain data.

A prompt is a *recipe*: for every prefill position, which text token (through
the text projection) and which codec entry (talker codec embedding, the
speaker vector, or a reference frame) are summed into its input embedding;
plus the trailing text queue fed one entry per decode step. The recipe is
small, serialisable (it travels to the vLLM worker inside `SamplingParams`),
and turned into embeddings in one vectorised pass by `TalkerEmbeddings`.

Layouts: instruct block, role block, codec control block, then
a mode-dependent tail (plain streaming / non-streaming text input, or ICL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..base.config import TTSConfig
from ..base.params import PromptError

NO_TEXT = -1
NO_CODEC = -1
SPEAKER_VECTOR = -2  # codec slot filled with the request's x-vector
NO_REF = -1


@dataclass(frozen=True)
class SpeechRequest:
    """One utterance to synthesize, in the model's terms."""

    text: str
    language: str = "auto"
    speaker: str | None = None  # CustomVoice preset speaker
    instructions: str | None = None  # CustomVoice 1.7B / VoiceDesign
    ref_text: str | None = None  # Base ICL transcript of the reference audio
    ref_codes: Sequence[Sequence[int]] | None = None  # Base ICL reference codes [T_ref, 16]
    xvector: Sequence[float] | None = None  # Base speaker embedding [H]
    non_streaming_mode: bool | None = None  # None: the checkpoint family's default


@dataclass
class PromptRecipe:
    text_ids: list[int]  # per prefill position: text token or NO_TEXT
    codec_ids: list[int]  # per prefill position: talker codec id, NO_CODEC or SPEAKER_VECTOR
    ref_frames: list[int]  # per prefill position: index into ref_codes or NO_REF
    trailing_text_ids: list[int]  # text addend of decode step k (PAD once exhausted)
    pad_text_id: int
    xvector: list[float] | None = None
    ref_codes: list[list[int]] | None = None
    non_streaming_mode: bool = True
    mode: str = "custom_voice"  # custom_voice | voice_design | base_xvector | base_icl
    language_id: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.text_ids)

    def text_addend_id(self, step: int) -> int:
        """Text token whose projection is added to the input of decode step `step`."""
        return self.trailing_text_ids[step] if step < len(self.trailing_text_ids) else self.pad_text_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1,
            "text_ids": self.text_ids,
            "codec_ids": self.codec_ids,
            "ref_frames": self.ref_frames,
            "trailing_text_ids": self.trailing_text_ids,
            "pad_text_id": self.pad_text_id,
            "xvector": self.xvector,
            "ref_codes": self.ref_codes,
            "non_streaming_mode": self.non_streaming_mode,
            "mode": self.mode,
            "language_id": self.language_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptRecipe":
        if d.get("v") != 1:
            raise PromptError(f"unsupported prompt recipe version {d.get('v')!r}")
        n = len(d["text_ids"])
        if not (len(d["codec_ids"]) == len(d["ref_frames"]) == n) or n == 0:
            raise PromptError("malformed prompt recipe: per-position lists differ in length or are empty")
        return cls(
            text_ids=list(d["text_ids"]),
            codec_ids=list(d["codec_ids"]),
            ref_frames=list(d["ref_frames"]),
            trailing_text_ids=list(d["trailing_text_ids"]),
            pad_text_id=int(d["pad_text_id"]),
            xvector=None if d.get("xvector") is None else list(d["xvector"]),
            ref_codes=None if d.get("ref_codes") is None else [list(r) for r in d["ref_codes"]],
            non_streaming_mode=bool(d.get("non_streaming_mode", True)),
            mode=str(d.get("mode", "custom_voice")),
            language_id=d.get("language_id"),
        )


ROLE_PREFIX = "assistant\n"  # after <|im_start|>: the role tokens before the text to speak


def assistant_text(text: str) -> str:
    return f"<|im_start|>{ROLE_PREFIX}{text}<|im_end|>\n<|im_start|>assistant\n"


def split_assistant_ids(ids: list[int]) -> tuple[list[int], list[int]]:
    """(role tokens, text tokens to speak) of `assistant_text`'s tokens: the text's are tokenized
    inside the assistant turn, less its 3 role tokens and its 5 closing ones."""
    return ids[:3], ids[3:-5]


def target_text_ids(tokenizer, text: str) -> list[int]:
    """The text tokens to speak, as the prompt has them."""
    return split_assistant_ids(_encode(tokenizer, assistant_text(text)))[1]


def reference_text(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


def instruct_text(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n"


def resolve_language(cfg: TTSConfig, language: str | None, speaker: str | None) -> int | None:
    """Codec language id, or None for Auto. A dialect speaker overrides Chinese/Auto."""
    lang = (language or "auto").strip().lower()
    table = cfg.talker.codec_language_id
    if lang == "auto":
        language_id = None
    elif lang in table and "dialect" not in lang:
        language_id = table[lang]
    else:
        raise PromptError(f"unsupported language {language!r}; supported: {', '.join(cfg.languages)}")
    if speaker and lang in ("chinese", "auto"):
        dialect = cfg.talker.spk_is_dialect.get(speaker.lower(), False)
        if dialect:
            language_id = table[dialect]
    return language_id


def _encode(tokenizer, s: str) -> list[int]:
    return list(tokenizer(s, add_special_tokens=False)["input_ids"])


class TextIncomplete(PromptError):
    """More text is needed before an incremental request can start (its prompt layout is not fixed yet)."""


def build_prompt(cfg: TTSConfig, tokenizer, req: SpeechRequest,
                 tokens: tuple[list[int], list[int]] | None = None, input_closed: bool = True) -> PromptRecipe:
    """Prefill recipe and trailing text queue for `req` on this checkpoint.

    `tokens`: (role ids, text ids) already tokenized (an incremental request's committed tokens,
    `IncrementalTokenizer`), instead of tokenizing `req.text`. `input_closed` False: more text will
    come, so the trailing text has no end-of-text yet; only streaming text mode can start so, and
    a voice clone's (ICL) only once its text is longer than its reference (`TextIncomplete` before)."""
    t = cfg.talker
    if tokens is None and (not req.text or not req.text.strip()):
        raise PromptError("input text is empty")
    kind = cfg.tts_model_type
    speaker = (req.speaker or "").strip().lower() or None
    instructions = req.instructions or None

    if kind == "custom_voice":
        if speaker is not None and speaker not in t.spk_id:
            raise PromptError(f"unknown speaker {req.speaker!r}; this checkpoint has: {', '.join(cfg.speakers)}")
        if instructions and not cfg.supports_instruct:
            raise PromptError("this checkpoint (0.6B CustomVoice) does not support instructions")
        mode = "custom_voice"
    elif kind == "voice_design":
        if speaker is not None:
            raise PromptError("VoiceDesign checkpoints have no preset speakers; describe the voice in `instructions`")
        mode = "voice_design"
    else:  # base
        if speaker is not None:
            raise PromptError("Base checkpoints clone a reference voice; they have no preset speakers")
        if instructions:
            raise PromptError("Base checkpoints do not support instructions")
        if req.xvector is None:
            raise PromptError("Base checkpoints need a reference voice (x-vector)")
        if len(req.xvector) != t.decoder.hidden_size:
            raise PromptError(f"x-vector has {len(req.xvector)} values; this checkpoint needs {t.decoder.hidden_size}")
        if req.ref_codes is not None:
            if not req.ref_text or not req.ref_text.strip():
                raise PromptError("in-context voice cloning needs the reference transcript (ref_text)")
            mode = "base_icl"
        else:
            mode = "base_xvector"

    non_streaming = req.non_streaming_mode
    if non_streaming is None:
        non_streaming = kind != "base"
    language_id = resolve_language(cfg, req.language, speaker if kind == "custom_voice" else None)

    role, target = tokens if tokens is not None else split_assistant_ids(_encode(tokenizer, assistant_text(req.text)))
    if not target:
        raise TextIncomplete("input text produced no tokens") if not input_closed else PromptError(
            "input text produced no tokens")
    if not input_closed and non_streaming:
        raise PromptError("non-streaming text mode needs the whole text before it starts")
    end = [cfg.tts_eos_token_id] if input_closed else []

    text_ids: list[int] = []
    codec_ids: list[int] = []
    ref_frames: list[int] = []

    def put(text_id: int = NO_TEXT, codec_id: int = NO_CODEC, ref: int = NO_REF) -> None:
        text_ids.append(text_id)
        codec_ids.append(codec_id)
        ref_frames.append(ref)

    if instructions and mode in ("custom_voice", "voice_design"):
        for tok in _encode(tokenizer, instruct_text(instructions)):
            put(tok)
    for tok in role:
        put(tok)

    if language_id is None:
        control = [t.codec_nothink_id, t.codec_think_bos_id, t.codec_think_eos_id]
    else:
        control = [t.codec_think_id, t.codec_think_bos_id, language_id, t.codec_think_eos_id]
    if mode == "custom_voice" and speaker is not None:
        control.append(t.spk_id[speaker])
    elif mode.startswith("base"):
        control.append(SPEAKER_VECTOR)
    control.append(t.codec_pad_id)
    # The control block pairs PAD...PAD, BOS on the text track with every codec
    # entry but the final codec BOS, which belongs to the tail.
    for i, codec in enumerate(control):
        put(cfg.tts_bos_token_id if i == len(control) - 1 else cfg.tts_pad_token_id, codec)

    pad, eos = cfg.tts_pad_token_id, cfg.tts_eos_token_id
    ref_codes = None
    if mode == "base_icl":
        ref_codes = [[int(c) for c in frame] for frame in req.ref_codes]
        if not ref_codes or any(len(f) != t.num_code_groups for f in ref_codes):
            raise PromptError(f"reference codes must be a non-empty [T, {t.num_code_groups}] array")
        ref_ids = _encode(tokenizer, reference_text(req.ref_text))[3:-2]
        x = ref_ids + target + end
        y = [(t.codec_bos_id, NO_REF)] + [(NO_CODEC, j) for j in range(len(ref_codes))]
        if not input_closed and not non_streaming and len(x) <= len(y):
            raise TextIncomplete(f"a voice clone starts once its text is longer than its reference "
                                 f"({len(x)} of {len(y) + 1} tokens so far)")
        if non_streaming:
            for tok in x:
                put(tok, t.codec_pad_id)
            for codec, ref in y:
                put(pad, codec, ref)
            trailing = [pad]
        elif len(x) > len(y):
            for tok, (codec, ref) in zip(x, y):
                put(tok, codec, ref)
            trailing = x[len(y):]
        else:
            for j, (codec, ref) in enumerate(y):
                put(x[j] if j < len(x) else pad, codec, ref)
            trailing = [pad]
    elif non_streaming:
        for tok in target:
            put(tok, t.codec_pad_id)
        put(eos, t.codec_pad_id)
        put(pad, t.codec_bos_id)
        trailing = [pad]
    else:
        put(target[0], t.codec_bos_id)
        trailing = target[1:] + end

    return PromptRecipe(
        text_ids=text_ids,
        codec_ids=codec_ids,
        ref_frames=ref_frames,
        trailing_text_ids=trailing,
        pad_text_id=pad,
        xvector=None if req.xvector is None else [float(v) for v in req.xvector],
        ref_codes=ref_codes,
        non_streaming_mode=non_streaming,
        mode=mode,
        language_id=language_id,
    )

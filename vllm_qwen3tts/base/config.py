"""Typed view of a Qwen3-TTS checkpoint's `config.json` and `generation_config.json`.

Every component reads its geometry and token ids from here, never from
hard-coded defaults: fine-tuned checkpoints add speakers, and the tiny test
checkpoints shrink every width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "qwen3_tts"
CODEC_MODEL_TYPE = "qwen3_tts_tokenizer_12hz"
TTS_MODEL_TYPES = ("base", "custom_voice", "voice_design")


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or holds something we cannot serve."""


@dataclass(frozen=True)
class DecoderGeometry:
    """Shape of a Qwen3-style decoder stack (talker or code predictor)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderGeometry":
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers 5 style
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(d["num_key_value_heads"]),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        )


@dataclass(frozen=True)
class CodePredictorConfig:
    decoder: DecoderGeometry
    vocab_size: int  # entries per residual codebook
    num_code_groups: int


@dataclass(frozen=True)
class TalkerConfig:
    decoder: DecoderGeometry
    vocab_size: int  # codebook-0 codes plus control ids
    text_vocab_size: int
    text_hidden_size: int
    num_code_groups: int
    codec_pad_id: int
    codec_bos_id: int
    codec_eos_id: int
    codec_think_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    codec_language_id: dict[str, int]
    spk_id: dict[str, int]
    spk_is_dialect: dict[str, str | bool]
    code_predictor: CodePredictorConfig

    @property
    def num_audio_codes(self) -> int:
        """Codebook-0 codes are [0, vocab - 1024); the rest are control ids."""
        return self.vocab_size - 1024

    def suppressed_ids(self) -> list[int]:
        """Ids the talker may never sample: every control id except EOS."""
        return [i for i in range(self.num_audio_codes, self.vocab_size) if i != self.codec_eos_id]


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    mel_dim: int = 128
    enc_dim: int = 1024
    enc_channels: tuple[int, ...] = (512, 512, 512, 512, 1536)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 128
    enc_res2net_scale: int = 8
    enc_se_channels: int = 128
    sample_rate: int = 24000

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpeakerEncoderConfig":
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)


@dataclass(frozen=True)
class GenerationDefaults:
    """`generation_config.json`: sampling defaults for code 0 and the code predictor."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    max_new_tokens: int = 2048
    subtalker_dosample: bool = True
    subtalker_temperature: float = 0.9
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationDefaults":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class TTSConfig:
    tts_model_type: str  # base | custom_voice | voice_design
    tts_model_size: str  # 0b6 | 1b7
    im_start_token_id: int
    im_end_token_id: int
    tts_pad_token_id: int
    tts_bos_token_id: int
    tts_eos_token_id: int
    talker: TalkerConfig
    speaker_encoder: SpeakerEncoderConfig | None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def supports_instruct(self) -> bool:
        # The released 0.6B CustomVoice ignores instructions; the official wrapper drops them.
        if self.tts_model_type == "voice_design":
            return True
        return self.tts_model_type == "custom_voice" and self.tts_model_size != "0b6"

    @property
    def supports_voice_clone(self) -> bool:
        return self.tts_model_type == "base"

    @property
    def speakers(self) -> list[str]:
        return sorted(self.talker.spk_id)

    @property
    def languages(self) -> list[str]:
        """Selectable languages; dialects are reached only through a dialect speaker."""
        return ["auto"] + [k for k in self.talker.codec_language_id if "dialect" not in k]


def _speaker_ids(raw: dict[str, Any] | None) -> dict[str, int]:
    # Released configs store `"serena": [3066]`; fine-tunes may store a bare int.
    out = {}
    for name, value in (raw or {}).items():
        out[name.lower()] = int(value[0] if isinstance(value, (list, tuple)) else value)
    return out


def parse_tts_config(cfg: dict[str, Any], generation: dict[str, Any] | None = None) -> TTSConfig:
    if cfg.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"config.json has model_type {cfg.get('model_type')!r}; expected {MODEL_TYPE!r} "
            "(a Qwen3-TTS-12Hz checkpoint)"
        )
    if cfg.get("tokenizer_type", CODEC_MODEL_TYPE) != CODEC_MODEL_TYPE:
        raise CheckpointError(
            f"tokenizer_type {cfg.get('tokenizer_type')!r} is not supported; only {CODEC_MODEL_TYPE!r} (12 Hz)"
        )
    tts_type = cfg.get("tts_model_type")
    if tts_type not in TTS_MODEL_TYPES:
        raise CheckpointError(f"tts_model_type {tts_type!r} is not one of {TTS_MODEL_TYPES}")
    t = cfg["talker_config"]
    cp = t["code_predictor_config"]
    talker = TalkerConfig(
        decoder=DecoderGeometry.from_dict(t),
        vocab_size=int(t["vocab_size"]),
        text_vocab_size=int(t["text_vocab_size"]),
        text_hidden_size=int(t["text_hidden_size"]),
        num_code_groups=int(t["num_code_groups"]),
        codec_pad_id=int(t["codec_pad_id"]),
        codec_bos_id=int(t["codec_bos_id"]),
        codec_eos_id=int(t["codec_eos_token_id"]),
        codec_think_id=int(t["codec_think_id"]),
        codec_nothink_id=int(t["codec_nothink_id"]),
        codec_think_bos_id=int(t["codec_think_bos_id"]),
        codec_think_eos_id=int(t["codec_think_eos_id"]),
        codec_language_id={k.lower(): int(v) for k, v in (t.get("codec_language_id") or {}).items()},
        spk_id=_speaker_ids(t.get("spk_id")),
        spk_is_dialect={k.lower(): v for k, v in (t.get("spk_is_dialect") or {}).items()},
        code_predictor=CodePredictorConfig(
            decoder=DecoderGeometry.from_dict(cp),
            vocab_size=int(cp["vocab_size"]),
            num_code_groups=int(cp.get("num_code_groups", t["num_code_groups"])),
        ),
    )
    speaker_encoder = None
    if tts_type == "base":
        speaker_encoder = SpeakerEncoderConfig.from_dict(cfg.get("speaker_encoder_config") or {})
    return TTSConfig(
        tts_model_type=tts_type,
        tts_model_size=str(cfg.get("tts_model_size", "")),
        im_start_token_id=int(cfg.get("im_start_token_id", 151644)),
        im_end_token_id=int(cfg.get("im_end_token_id", 151645)),
        tts_pad_token_id=int(cfg.get("tts_pad_token_id", 151671)),
        tts_bos_token_id=int(cfg.get("tts_bos_token_id", 151672)),
        tts_eos_token_id=int(cfg.get("tts_eos_token_id", 151673)),
        talker=talker,
        speaker_encoder=speaker_encoder,
        generation=GenerationDefaults.from_dict(generation or {}),
    )


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent} (is this a Qwen3-TTS checkpoint directory?)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_tts_config(model_dir: str | Path) -> TTSConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
    cfg = read_json(model_dir / "config.json")
    gen_path = model_dir / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else {}
    return parse_tts_config(cfg, gen)

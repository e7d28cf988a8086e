"""Reference audio -> voice-clone profile: what a Base model needs to clone a voice.

ICL mode conditions on the reference codes and transcript plus the x-vector; x-vector-only
mode uses just the speaker embedding. A profile depends only on the audio, the transcript
and the checkpoint, so the server can cache it per voice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vllm_qwen3tts.base.config import CheckpointError

from .audio import DEFAULT_MAX_REFERENCE_SECONDS, AudioSource, load_reference_audio
from .encoder import CodecEncoder, load_codec_encoder
from .speaker_encoder import SpeakerEncoder, load_speaker_encoder


@dataclass(frozen=True)
class VoiceCloneProfile:
    xvector: torch.Tensor  # [talker hidden], speaker-encoder dtype, CPU
    ref_codes: torch.Tensor | None  # [T_ref, 16] int64, CPU; None in x-vector-only mode
    ref_text: str | None

    @property
    def x_vector_only(self) -> bool:
        return self.ref_codes is None


@dataclass(frozen=True)
class VoiceCloneEncoders:
    codec: CodecEncoder
    speaker: SpeakerEncoder


def load_voice_clone_encoders(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VoiceCloneEncoders:
    """Codec encoder and speaker encoder of a Base checkpoint (raises `CheckpointError` otherwise)."""
    speaker = load_speaker_encoder(model_dir, device=device, dtype=dtype)
    return VoiceCloneEncoders(codec=load_codec_encoder(model_dir, device=device, dtype=dtype), speaker=speaker)


def create_voice_clone_profile(
    encoders: VoiceCloneEncoders,
    audio: AudioSource | tuple[np.ndarray, int],
    ref_text: str | None = None,
    *,
    x_vector_only: bool = False,
    max_seconds: float | None = DEFAULT_MAX_REFERENCE_SECONDS,
) -> VoiceCloneProfile:
    """Encoded audio (bytes or path) or `(waveform, sample_rate)` -> profile.

    ICL mode (the default) needs the reference transcript; x-vector-only mode keeps
    `ref_text` as given but encodes no codes.
    """
    if not x_vector_only and not ref_text:
        raise ValueError("ref_text (the transcript of the reference audio) is required unless x_vector_only is set")
    if encoders.speaker.config.sample_rate != encoders.codec.config.sample_rate:
        raise CheckpointError("speaker encoder and codec encoder expect different sample rates")
    # One resampled waveform serves both encoders: the reference resamples the same input
    # the same way for each, so the results are identical.
    wav = load_reference_audio(audio, max_seconds=max_seconds, target_sr=encoders.codec.config.sample_rate)
    xvector = encoders.speaker.embed(wav)
    ref_codes = None if x_vector_only else encoders.codec.encode([wav])[0]
    return VoiceCloneProfile(xvector=xvector, ref_codes=ref_codes, ref_text=ref_text)

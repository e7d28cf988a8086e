"""Speaker encoder of the Base checkpoints: 24 kHz waveform -> x-vector (ECAPA-TDNN).

The x-vector fills the speaker slot of the talker's control prefix in voice-clone
requests, so its width equals the talker hidden size (`speaker_encoder_config.enc_dim`).
Weights live under `speaker_encoder.` in the checkpoint's `model.safetensors`;
module names below are chosen to equal the checkpoint names after that prefix.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vllm_qwen3tts.base.config import CheckpointError, SpeakerEncoderConfig, load_tts_config
from vllm_qwen3tts.base.weight_loading import copy_tensors, read_safetensors

WEIGHT_PREFIX = "speaker_encoder."

# Mel front end geometry; fixed by the official extractor rather than read from the config.
N_FFT = 1024
HOP_LENGTH = 256
WIN_LENGTH = 1024
MEL_FMIN = 0.0
LOG_FLOOR = 1e-5
MAGNITUDE_EPS = 1e-9


# ------------------------------------------------------------------------------------------
# mel front end


@lru_cache(maxsize=4)
def _mel_filterbank(sample_rate: int, num_mels: int) -> np.ndarray:
    # librosa defaults: Slaney mel scale and Slaney area normalisation
    import librosa  # imported here: only voice cloning needs it

    return librosa.filters.mel(
        sr=sample_rate, n_fft=N_FFT, n_mels=num_mels, fmin=MEL_FMIN, fmax=sample_rate / 2
    ).astype(np.float32)


def log_mel_spectrogram(wav: torch.Tensor, sample_rate: int, num_mels: int) -> torch.Tensor:
    """`[B, n]` waveform -> `[B, num_mels, frames]` log-mel, always computed in float32.

    frames = (n + 2*384 - 1024) // 256 + 1: the input is reflect-padded by (n_fft - hop)/2
    and the STFT itself is not centred.
    """
    wav = wav.float()
    pad = (N_FFT - HOP_LENGTH) // 2
    wav = F.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    window = torch.hann_window(WIN_LENGTH, periodic=True, device=wav.device)
    spectrum = torch.stft(
        wav, N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window=window,
        center=False, normalized=False, onesided=True, return_complex=True,
    )
    # the epsilon inside the root keeps the gradient finite at silent bins; parity needs it too
    magnitude = torch.sqrt(torch.view_as_real(spectrum).pow(2).sum(-1) + MAGNITUDE_EPS)
    filterbank = torch.from_numpy(_mel_filterbank(sample_rate, num_mels)).to(wav.device)
    mel = torch.matmul(filterbank, magnitude)
    return torch.log(torch.clamp(mel, min=LOG_FLOOR))


def num_mel_frames(num_samples: int) -> int:
    return (num_samples + (N_FFT - HOP_LENGTH) - N_FFT) // HOP_LENGTH + 1


# ------------------------------------------------------------------------------------------
# ECAPA-TDNN


class TimeDelayLayer(nn.Module):
    """Conv1d ("same" length, reflect padding) followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, dilation=dilation, padding="same", padding_mode="reflect"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class Res2NetLayer(nn.Module):
    """Channels split into `scale` groups; group 0 passes through, group g >= 1 goes through
    its own TDNN after adding the previous group's output (hierarchical receptive field)."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int):
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(
            TimeDelayLayer(width, width, kernel_size, dilation) for _ in range(scale - 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.chunk(x, self.scale, dim=1)
        outputs = [groups[0]]
        previous = None
        for group, block in zip(groups[1:], self.blocks):
            previous = block(group if previous is None else group + previous)
            outputs.append(previous)
        return torch.cat(outputs, dim=1)


class SqueezeExcitation(nn.Module):
    """Per-channel gate computed from the time-averaged input."""

    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, bottleneck, kernel_size=1)
        self.conv2 = nn.Conv1d(bottleneck, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=2, keepdim=True)
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(gate))))
        return x * gate


class SERes2NetBlock(nn.Module):
    """TDNN (k 1) -> Res2Net -> TDNN (k 1) -> squeeze-excitation, plus the block input."""

    def __init__(self, in_channels: int, channels: int, scale: int, se_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        if in_channels != channels:
            raise CheckpointError(
                f"SE-Res2Net block maps {in_channels} -> {channels} channels; the identity shortcut needs them equal"
            )
        self.tdnn1 = TimeDelayLayer(in_channels, channels, kernel_size=1)
        self.res2net_block = Res2NetLayer(channels, scale, kernel_size, dilation)
        self.tdnn2 = TimeDelayLayer(channels, channels, kernel_size=1)
        self.se_block = SqueezeExcitation(channels, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def _weighted_mean_std(x: torch.Tensor, weights: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over time of `x [B, C, T]` under weights summing to 1 over T."""
    mean = (weights * x).sum(dim=2)
    variance = (weights * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)
    return mean, torch.sqrt(variance.clamp(min=eps))


class AttentiveStatisticsPooling(nn.Module):
    """Attention over time conditioned on global utterance statistics -> [attended mean, attended std]."""

    eps = 1e-12

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TimeDelayLayer(3 * channels, attention_channels, kernel_size=1)
        self.conv = nn.Conv1d(attention_channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_frames = x.shape[2]
        # 1/T built as ones / sum(ones) in the activation dtype, as the reference does
        # (in bf16 the frame count itself rounds)
        uniform = x.new_ones(x.shape[0], 1, num_frames)
        uniform = uniform / uniform.sum(dim=2, keepdim=True)
        mean, std = _weighted_mean_std(x, uniform, self.eps)
        context = torch.cat(
            [x, mean.unsqueeze(2).expand(-1, -1, num_frames), std.unsqueeze(2).expand(-1, -1, num_frames)], dim=1
        )
        attention = torch.softmax(self.conv(torch.tanh(self.tdnn(context))), dim=2)
        mean, std = _weighted_mean_std(x, attention, self.eps)
        return torch.cat([mean, std], dim=1).unsqueeze(2)


class SpeakerEncoder(nn.Module):
    """ECAPA-TDNN over a 128-band log-mel of 24 kHz audio; `embed(wav)` -> x-vector `[enc_dim]`."""

    def __init__(self, config: SpeakerEncoderConfig):
        super().__init__()
        channels, kernels, dilations = config.enc_channels, config.enc_kernel_sizes, config.enc_dilations
        if not (len(channels) == len(kernels) == len(dilations)) or len(channels) < 3:
            raise CheckpointError(
                "speaker_encoder_config: enc_channels, enc_kernel_sizes and enc_dilations need one equal length >= 3"
            )
        if config.sample_rate != 24000:
            raise CheckpointError(f"speaker encoder sample_rate {config.sample_rate}; only 24000 is supported")
        self.config = config
        self.blocks = nn.ModuleList([TimeDelayLayer(config.mel_dim, channels[0], kernels[0], dilations[0])])
        for i in range(1, len(channels) - 1):
            self.blocks.append(
                SERes2NetBlock(
                    channels[i - 1], channels[i], config.enc_res2net_scale, config.enc_se_channels,
                    kernels[i], dilations[i],
                )
            )
        if sum(channels[1:-1]) != channels[-1]:
            raise CheckpointError(
                f"speaker_encoder_config: enc_channels[-1] ({channels[-1]}) must equal the concatenated "
                f"SE-Res2Net outputs ({sum(channels[1:-1])})"
            )
        self.mfa = TimeDelayLayer(channels[-1], channels[-1], kernels[-1], dilations[-1])
        self.asp = AttentiveStatisticsPooling(channels[-1], config.enc_attention_channels)
        self.fc = nn.Conv1d(2 * channels[-1], config.enc_dim, kernel_size=1)
        # reflect padding needs more frames than its pad width in every conv
        self.min_frames = max(d * (k - 1) // 2 for k, d in zip(kernels, dilations)) + 1

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def min_samples(self) -> int:
        # the mel has n // hop frames, and its own reflect padding needs n > (n_fft - hop) / 2
        return max(self.min_frames * HOP_LENGTH, (N_FFT - HOP_LENGTH) // 2 + 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """`[B, mel_dim, frames]` -> `[B, enc_dim]`."""
        x = self.blocks[0](mel)
        block_outputs = []
        for block in self.blocks[1:]:
            x = block(x)
            block_outputs.append(x)
        x = self.mfa(torch.cat(block_outputs, dim=1))
        x = self.asp(x)
        return self.fc(x).squeeze(2)

    @torch.inference_mode()
    def embed(self, wav_24k: np.ndarray) -> torch.Tensor:
        """Mono float32 waveform at 24 kHz -> x-vector `[enc_dim]` in the module dtype, on the CPU."""
        wav = np.asarray(wav_24k)
        if wav.ndim != 1:
            raise ValueError(f"expected a mono waveform of shape [samples], got {wav.shape}")
        if wav.shape[0] < self.min_samples:
            raise ValueError(
                f"reference audio too short for the speaker encoder: {wav.shape[0]} samples, "
                f"need at least {self.min_samples} at 24 kHz"
            )
        samples = torch.from_numpy(wav.astype(np.float32, copy=False)).to(self.device).unsqueeze(0)
        mel = log_mel_spectrogram(samples, self.config.sample_rate, self.config.mel_dim)
        return self.forward(mel.to(self.dtype))[0].cpu()

    def load_weights(self, checkpoint: dict[str, torch.Tensor]) -> None:
        """Copy `speaker_encoder.*` tensors; every module tensor must be present and every
        checkpoint tensor consumed, with matching shapes."""
        own = self.state_dict()
        expected = {WEIGHT_PREFIX + name: name for name in own}
        copy_tensors(own, checkpoint, expected, what="speaker encoder", accept_unmapped=False)


def read_speaker_encoder_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The `speaker_encoder.*` tensors of a checkpoint directory, by checkpoint name."""
    return dict(read_safetensors(Path(model_dir) / "model.safetensors", WEIGHT_PREFIX, what="speaker encoder weights"))


def load_speaker_encoder(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SpeakerEncoder:
    """The speaker encoder of a Base checkpoint directory, in eval mode on `device` / `dtype`."""
    config = load_tts_config(model_dir)
    if config.speaker_encoder is None:
        raise CheckpointError(
            f"{model_dir} is a {config.tts_model_type} checkpoint; voice cloning needs a Base checkpoint "
            "(only Base models ship a speaker encoder)"
        )
    weights = read_speaker_encoder_weights(model_dir)
    if not weights:
        raise CheckpointError(f"{model_dir}/model.safetensors holds no {WEIGHT_PREFIX}* tensors")
    encoder = SpeakerEncoder(config.speaker_encoder)
    # weights are bf16 on disk; copy_ upcasts them into the fp32 module, then cast once to the target
    encoder.load_weights(weights)
    return encoder.to(device=device, dtype=dtype).eval()

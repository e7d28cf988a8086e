"""Qwen3-TTS 12 Hz codec decoder: 16-codebook codes -> 24 kHz waveform.

Architecture: split-RVQ dequantizer, causal pre-conv, an 8-layer
sliding-window transformer, two ConvNeXt upsampling stages and a SnakeBeta
vocoder (four transposed-conv blocks). Everything is causal, so one code path
serves both uses:

- whole utterances: `decode` (the official procedure, including its 300/25 frame
  chunking of long utterances) and `forward` (one pass over any length);
- incremental streaming: `decode_chunk` carries a fixed-size per-stream state
  (conv input tails, transposed-conv input frames, a sliding-window KV cache)
  and emits exactly the samples a single whole-utterance pass would.

`forward` is `decode_chunk` on a fresh state, so streaming and whole decoding
cannot drift apart structurally; they differ only by floating-point blocking.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vllm_qwen3tts.base.config import CODEC_MODEL_TYPE, CheckpointError, read_json
from vllm_qwen3tts.model.layers import GatedMLP, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from vllm_qwen3tts.base.weight_loading import WeightTarget, read_safetensors, stacked_name_map, stacked_shard_rows

# Constants fixed by the official implementation rather than by the config.
CODEBOOK_USAGE_EPS = 1e-5  # clamp of cluster_usage before dividing embedding_sum by it
SNAKE_EPS = 1e-9  # keeps 1 / exp(beta) finite
CONVNEXT_NORM_EPS = 1e-6
CONV_KERNEL = 7  # pre-vocoder conv, ConvNeXt depthwise conv, residual-unit convs, output conv
PRE_CONV_KERNEL = 3
RESIDUAL_DILATIONS = (1, 3, 9)
CONVNEXT_EXPANSION = 4
# Official long-utterance decode: 300-frame chunks, each re-decoded with 25 frames of left context.
OFFICIAL_CHUNK_FRAMES = 300
OFFICIAL_LEFT_CONTEXT_FRAMES = 25
PAD_CODE = -1



class ConvCarry:
    """Streaming conv state of one `decode_chunk` call, in forward order: the tails the previous
    chunk saved (consumed one per stateful conv) and the tails saved for the next chunk.

    In a ragged batch (`lengths` given) row b holds only `lengths[b]` real frames of the chunk's
    `frames`, the rest padding; its next tail is then cut where its real samples end, at every
    conv's own time resolution, so padding never enters a stream's state.
    """

    def __init__(self, tails: list[torch.Tensor], frames: int, lengths: torch.Tensor | None):
        self.tails_in: Iterator[torch.Tensor] = iter(tails)
        self.tails_out: list[torch.Tensor] = []
        self.frames = frames
        self.lengths = lengths

    def extend(self, x: torch.Tensor, context: int) -> torch.Tensor:
        """x [B, C, T] (this chunk's input of a conv) -> the previous tail followed by x; the
        last `context` real samples are kept for the next chunk."""
        x = torch.cat([next(self.tails_in), x], dim=-1)
        new = x.shape[-1] - context
        if self.lengths is None:
            self.tails_out.append(x[..., new:])
        else:
            # row b's tail: its last `context` samples before the padding, i.e. x[b, :, end - context : end]
            # with end = context + lengths[b] * samples per frame at this resolution
            start = self.lengths * (new // self.frames)
            index = start[:, None] + torch.arange(context, device=x.device)
            self.tails_out.append(torch.gather(x, 2, index[:, None, :].expand(-1, x.shape[1], -1)))
        return x


# ----------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class CodecDecoderConfig:
    """`decoder_config` of `speech_tokenizer/config.json` (sizes only; nothing hard-coded)."""

    codebook_size: int
    codebook_dim: int  # width after the RVQ output projections; each codebook holds codebook_dim // 2
    num_quantizers: int
    num_semantic_quantizers: int
    latent_dim: int
    decoder_dim: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int
    upsample_rates: tuple[int, ...]  # vocoder blocks
    upsampling_ratios: tuple[int, ...]  # ConvNeXt stages right after the transformer

    @classmethod
    def from_dict(cls, d: dict) -> "CodecDecoderConfig":
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"codec decoder hidden_act {d['hidden_act']!r} is not supported (only silu)")
        if d.get("attention_bias", False):
            raise CheckpointError("codec decoder with attention_bias=true is not supported")
        if int(d.get("num_semantic_quantizers", 1)) != 1:
            # the official decoder hard-codes one semantic codebook whatever the config says
            raise CheckpointError("codec decoder expects num_semantic_quantizers == 1")
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers 5 style
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            codebook_size=int(d["codebook_size"]),
            codebook_dim=int(d["codebook_dim"]),
            num_quantizers=int(d["num_quantizers"]),
            num_semantic_quantizers=1,
            latent_dim=int(d["latent_dim"]),
            decoder_dim=int(d["decoder_dim"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads", d["num_attention_heads"])),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=float(rope_theta),
            sliding_window=int(d["sliding_window"]),
            upsample_rates=tuple(int(r) for r in d["upsample_rates"]),
            upsampling_ratios=tuple(int(r) for r in d["upsampling_ratios"]),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "CodecDecoderConfig":
        cfg = read_json(speech_tokenizer_dir(model_dir) / "config.json")
        if cfg.get("model_type") != CODEC_MODEL_TYPE:
            raise CheckpointError(
                f"speech tokenizer model_type {cfg.get('model_type')!r} is not {CODEC_MODEL_TYPE!r}"
            )
        config = cls.from_dict(cfg["decoder_config"])
        declared = cfg.get("decode_upsample_rate")
        if declared is not None and int(declared) != config.samples_per_frame:
            raise CheckpointError(
                f"decode_upsample_rate {declared} does not match the decoder's upsampling "
                f"{config.upsampling_ratios} x {config.upsample_rates} = {config.samples_per_frame}"
            )
        return config

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsampling_ratios) * math.prod(self.upsample_rates)

    @property
    def codebook_entry_dim(self) -> int:
        return self.codebook_dim // 2

    @property
    def kv_cache_len(self) -> int:
        """Past positions a query can still see: the window minus the query itself."""
        return self.sliding_window - 1


def speech_tokenizer_dir(model_dir: str | Path) -> Path:
    """`model_dir/speech_tokenizer` for a Qwen3-TTS checkpoint, or `model_dir` if it is one itself."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
    nested = model_dir / "speech_tokenizer"
    return nested if nested.is_dir() else model_dir


# ----------------------------------------------------------------------------------------------
# layers


class CausalConv1d(nn.Module):
    """Stride-1 conv that sees only the past: `(kernel - 1) * dilation` input samples of left context.

    Whole-sequence and streamed use share `forward_chunk`: the caller provides the
    last `context` input samples of the previous chunk (zeros at stream start, which
    is exactly the official zero padding) and receives the tail for the next chunk.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.dilation = dilation
        self.groups = groups
        self.in_channels = in_channels
        self.context = (kernel_size - 1) * dilation
        self.channels_last = False  # CodecDecoder.use_channels_last

    def forward_chunk(self, x: torch.Tensor, carry: ConvCarry) -> torch.Tensor:
        if self.context > 0:
            x = carry.extend(x, self.context)
        if self.dilation > 1:
            return dilated_conv_by_phases(self.undilated_conv, x, self.dilation, self.weight.shape[-1])
        return self.undilated_conv(x)

    def undilated_conv(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return F.conv2d(as_channels_last_2d(x), self.weight.unsqueeze(2), self.bias, groups=self.groups).squeeze(2)
        return F.conv1d(x, self.weight, self.bias, groups=self.groups)


def dilated_conv_by_phases(conv, x: torch.Tensor, dilation: int, taps: int) -> torch.Tensor:
    """A dilated conv (no padding) of x [B, C, L] as the undilated `conv` over x's `dilation`
    interleaved phases, stacked as a batch: output sample t = k * dilation + r only reads input
    samples of phase r. The same products and sums; the point is speed: cuDNN has no fast kernel
    for the vocoder's dilated convs (dilations 3 and 9) at most of the decoder's shapes: it falls
    back to a kernel without tensor cores, which the undilated phases avoid."""
    batch, channels, length = x.shape
    out_length = length - (taps - 1) * dilation
    per_phase = -(-out_length // dilation)  # outputs per phase, the last phases padded
    padded = (per_phase + taps - 1) * dilation
    x = F.pad(x, (0, padded - length))
    # x[b, c, m * dilation + r] -> phase r of stream b at position m: row b * dilation + r
    x = x.view(batch, channels, -1, dilation).permute(0, 3, 1, 2).reshape(batch * dilation, channels, -1)
    y = conv(x)  # [B * dilation, C_out, per_phase]
    y = y.view(batch, dilation, -1, per_phase).permute(0, 2, 3, 1).reshape(batch, -1, per_phase * dilation)
    return y[..., :out_length]


def as_channels_last_2d(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T] -> [B, C, 1, T] stored channels-last ([B, T, C] in memory): no copy when x
    already is (a channels-last conv's output, squeezed)."""
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


def store_channels_last(weight: nn.Parameter) -> None:
    """Re-lay a conv weight [A, B, k] out as [A, k, B] in memory, same values and shape, so that
    `weight.unsqueeze(2)` is a channels-last 4-D weight without a copy per call."""
    weight.data = weight.data.transpose(1, 2).contiguous().transpose(1, 2)


class CausalConvTranspose1d(nn.Module):
    """Transposed conv (kernel k, stride s) whose output is cut to exactly `s` samples per input frame.

    Each input frame spreads over k samples, so with k = 2s an output block also
    receives the second half of the previous frame's spread. Streaming therefore
    re-feeds the previous chunk's last `(k - s) / s` input frames and drops the
    samples they produce on their own: identical terms to a whole-sequence pass.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        if (kernel_size - stride) % stride != 0 or kernel_size < stride:
            raise ValueError(f"transposed conv kernel {kernel_size} must be a multiple of its stride {stride}")
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.stride = stride
        self.in_channels = in_channels
        self.context = (kernel_size - stride) // stride  # input frames
        self.channels_last = False  # CodecDecoder.use_channels_last

    def forward_chunk(self, x: torch.Tensor, carry: ConvCarry) -> torch.Tensor:
        new_frames = x.shape[-1]
        if self.context > 0:
            x = carry.extend(x, self.context)
        if self.channels_last:
            y = F.conv_transpose2d(as_channels_last_2d(x), self.weight.unsqueeze(2), self.bias,
                                   stride=(1, self.stride)).squeeze(2)
        else:
            y = F.conv_transpose1d(x, self.weight, self.bias, stride=self.stride)
        start = self.context * self.stride
        return y[..., start : start + new_frames * self.stride]


class SnakeBeta(nn.Module):
    """`x + sin²(exp(log_alpha)·x) / exp(log_beta)`, per channel, on [B, C, T]."""

    def __init__(self, channels: int):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.empty(channels))
        self.log_beta = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake(x, self.log_alpha, self.log_beta)


def snake(x: torch.Tensor, log_alpha: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    frequency = torch.exp(log_alpha)[None, :, None]
    magnitude = 1.0 / (torch.exp(log_beta)[None, :, None] + SNAKE_EPS)
    return x + magnitude * torch.sin(x * frequency).pow(2)


class ResidualCodebooks(nn.Module):
    """Split RVQ dequantizer: codebook 0 (semantic) and the sum of codebooks 1.. (acoustic),
    each projected by its own 1x1 conv, then added.

    The 16 tables are stacked into one parameter so a single gather serves all of them.
    Entries are `embedding_sum / max(cluster_usage, eps)`; dividing only the gathered rows
    gives the same values as the official divide-the-whole-table-then-gather.
    """

    def __init__(self, config: CodecDecoderConfig):
        super().__init__()
        q, v, d = config.num_quantizers, config.codebook_size, config.codebook_entry_dim
        self.num_quantizers = q
        self.codebook_size = v
        self.embedding_sum = nn.Parameter(torch.empty(q, v, d))
        self.cluster_usage = nn.Parameter(torch.empty(q, v))
        self.semantic_output_proj = nn.Parameter(torch.empty(config.codebook_dim, d, 1))
        self.acoustic_output_proj = nn.Parameter(torch.empty(config.codebook_dim, d, 1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, Q] (all >= 0) -> [B, codebook_dim, T]."""
        q = self.num_quantizers
        offsets = torch.arange(q, device=codes.device) * self.codebook_size
        rows = (codes.long() + offsets).reshape(-1)
        entries = self.embedding_sum.reshape(-1, self.embedding_sum.shape[-1])[rows]
        usage = self.cluster_usage.reshape(-1)[rows].clamp(min=CODEBOOK_USAGE_EPS)
        entries = (entries / usage[:, None]).reshape(*codes.shape, -1)  # [B, T, Q, D]
        # Acoustic codebooks are summed one after another, as the official code does,
        # so bf16 rounding matches it bit for bit.
        acoustic = entries[:, :, 1]
        for k in range(2, q):
            acoustic = acoustic + entries[:, :, k]
        semantic = F.conv1d(entries[:, :, 0].transpose(1, 2), self.semantic_output_proj)
        return semantic + F.conv1d(acoustic.transpose(1, 2), self.acoustic_output_proj)


class SlidingWindowAttention(nn.Module):
    """Multi-head attention with RoPE over a causal window of `sliding_window` positions.

    The past arrives as a fixed-size KV cache of the last `window - 1` positions
    (already rotated); slots before a stream's start are masked out by position.
    """

    def __init__(self, config: CodecDecoderConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor,
        past_keys: torch.Tensor,
        past_values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, hidden]; cos/sin [B, n, head_dim]; allowed [B, 1, n, past + n] (bool);
        past_* [B, kv_heads, past, head_dim]. Returns (out, keys, values) where keys/values
        cover past + n positions."""
        batch, n, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # per-row positions: broadcast over the heads
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys = torch.cat([past_keys, k], dim=2)
        values = torch.cat([past_values, v], dim=2)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=allowed, scale=self.head_dim**-0.5,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        out = out.transpose(1, 2).reshape(batch, n, self.q_size)
        return self.o_proj(out), keys, values


class TransformerLayer(nn.Module):
    """Pre-norm layer whose residual branches are scaled per channel (LayerScale)."""

    def __init__(self, config: CodecDecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = SlidingWindowAttention(config)
        self.attn_layer_scale = nn.Parameter(torch.empty(config.hidden_size))
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.mlp_layer_scale = nn.Parameter(torch.empty(config.hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor,
        past_keys: torch.Tensor,
        past_values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn_out, keys, values = self.attn(self.attn_norm(x), cos, sin, allowed, past_keys, past_values)
        x = x + self.attn_layer_scale * attn_out
        x = x + self.mlp_layer_scale * self.mlp(self.mlp_norm(x))
        return x, keys, values


class DecoderTransformer(nn.Module):
    """latent_dim -> hidden transformer -> latent_dim, on [B, n, latent_dim] with per-stream positions."""

    def __init__(self, config: CodecDecoderConfig):
        super().__init__()
        self.config = config
        self.input_proj = nn.Linear(config.latent_dim, config.hidden_size)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output_proj = nn.Linear(config.hidden_size, config.latent_dim)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, n, head_dim] for integer positions [B, n]; angles in fp32, then cast (HF order).
        The inverse frequencies are recomputed per call so that casting the module to bf16
        can never round them."""
        inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, device=positions.device)
        return rope_cos_sin(positions, inv_freq, dtype)

    def forward(self, x: torch.Tensor, state: "DecoderStreamState", lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, n, latent] -> [B, n, latent] for streams that have decoded `state.positions`
        frames so far. Replaces state.keys / state.values in place by the last window-1 positions
        (of the first `lengths[b]` new frames of row b when given; state.positions is left to the
        caller). Padding frames come after a row's real ones, so causality keeps them out of it."""
        n = x.shape[1]
        start_positions = state.positions
        window = self.config.sliding_window
        past = self.config.kv_cache_len
        steps = torch.arange(n, device=x.device)
        query_pos = start_positions[:, None] + steps  # [B, n]
        # cache slot j holds position start - past + j; the new keys continue that numbering
        key_pos = start_positions[:, None] - past + torch.arange(past + n, device=x.device)  # [B, past + n]
        qp, kp = query_pos[:, :, None], key_pos[:, None, :]
        allowed = ((kp >= 0) & (kp <= qp) & (kp > qp - window))[:, None]  # [B, 1, n, past + n]

        hidden = self.input_proj(x)
        cos, sin = self.rope(query_pos, hidden.dtype)
        if lengths is not None:  # the window ends after row b's real frames: cache positions lengths[b] + [0, past)
            index = (lengths[:, None] + torch.arange(past, device=x.device))[:, None, :, None]
            index = index.expand(-1, state.keys.shape[2], -1, state.keys.shape[4])
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            hidden, keys, values = layer(hidden, cos, sin, allowed, state.keys[i], state.values[i])
            if lengths is None:
                new_keys.append(keys[:, :, n:])
                new_values.append(values[:, :, n:])
            else:
                new_keys.append(torch.gather(keys, 2, index))
                new_values.append(torch.gather(values, 2, index))
        state.keys.copy_(torch.stack(new_keys))
        state.values.copy_(torch.stack(new_values))
        return self.output_proj(self.norm(hidden))


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv -> LayerNorm over channels -> MLP (GELU) -> per-channel gamma, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise_conv = CausalConv1d(channels, channels, CONV_KERNEL, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=CONVNEXT_NORM_EPS)
        self.pointwise_in = nn.Linear(channels, CONVNEXT_EXPANSION * channels)
        self.pointwise_out = nn.Linear(CONVNEXT_EXPANSION * channels, channels)
        self.gamma = nn.Parameter(torch.empty(channels))

    def forward_chunk(self, x: torch.Tensor, carry: ConvCarry) -> torch.Tensor:
        h = self.depthwise_conv.forward_chunk(x, carry).transpose(1, 2)
        h = self.pointwise_out(F.gelu(self.pointwise_in(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class UpsampleStage(nn.Module):
    def __init__(self, channels: int, ratio: int):
        super().__init__()
        self.upsample = CausalConvTranspose1d(channels, channels, ratio, ratio)
        self.convnext = ConvNeXtBlock(channels)

    def forward_chunk(self, x: torch.Tensor, carry: ConvCarry) -> torch.Tensor:
        x = self.upsample.forward_chunk(x, carry)
        return self.convnext.forward_chunk(x, carry)


class ResidualUnit(nn.Module):
    """x + pointwise(snake(dilated causal conv(snake(x))))."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.snake_in = SnakeBeta(channels)
        self.dilated_conv = CausalConv1d(channels, channels, CONV_KERNEL, dilation=dilation)
        self.snake_out = SnakeBeta(channels)
        self.pointwise_conv = CausalConv1d(channels, channels, 1)

    def forward_chunk(self, x: torch.Tensor, carry: ConvCarry) -> torch.Tensor:
        h = self.dilated_conv.forward_chunk(self.snake_in(x), carry)
        h = self.pointwise_conv.forward_chunk(self.snake_out(h), carry)
        return h + x


class VocoderBlock(nn.Module):
    """SnakeBeta, transposed conv upsampling by `rate` (halving channels), three residual units."""

    def __init__(self, in_channels: int, out_channels: int, rate: int):
        super().__init__()
        self.snake = SnakeBeta(in_channels)
        self.upsample = CausalConvTranspose1d(in_channels, out_channels, 2 * rate, rate)
        self.residual_units = nn.ModuleList(ResidualUnit(out_channels, d) for d in RESIDUAL_DILATIONS)

    def forward_chunk(self, x: torch.Tensor, carry: ConvCarry) -> torch.Tensor:
        x = self.upsample.forward_chunk(self.snake(x), carry)
        for unit in self.residual_units:
            x = unit.forward_chunk(x, carry)
        return x


# ----------------------------------------------------------------------------------------------
# streaming state


@dataclass
class DecoderStreamState:
    """Everything `decode_chunk` needs about the past of a batch of streams; fixed shapes.

    Row b of every tensor belongs to stream b. A fresh row (zeros, position 0) is a
    stream that has decoded nothing yet. Tensors are updated in place, so a CUDA
    graph captured over `decode_chunk` keeps valid addresses.
    """

    positions: torch.Tensor  # [B] int64: frames already decoded (the next frame's RoPE position)
    keys: torch.Tensor  # [layers, B, kv_heads, window - 1, head_dim]: rotated keys of the last positions
    values: torch.Tensor  # same shape as keys
    conv_tails: list[torch.Tensor]  # per causal (transposed) conv in forward order: [B, C_in, context]

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def select(self, idx: torch.Tensor) -> "DecoderStreamState":
        """A copy holding streams `idx` (in that order), to decode them as one batch."""
        idx = idx.to(self.positions.device)
        return DecoderStreamState(
            positions=self.positions.index_select(0, idx),
            keys=self.keys.index_select(1, idx),
            values=self.values.index_select(1, idx),
            conv_tails=[t.index_select(0, idx) for t in self.conv_tails],
        )

    def update(self, idx: torch.Tensor, sub: "DecoderStreamState") -> None:
        """Write `sub` (as returned by `select(idx)` and then advanced) back into rows `idx`."""
        idx = idx.to(self.positions.device)
        self.positions.index_copy_(0, idx, sub.positions)
        self.keys.index_copy_(1, idx, sub.keys)
        self.values.index_copy_(1, idx, sub.values)
        for mine, theirs in zip(self.conv_tails, sub.conv_tails, strict=True):
            mine.index_copy_(0, idx, theirs)

    def reset(self, idx: torch.Tensor) -> None:
        """Make rows `idx` fresh streams (e.g. a slot reused by a new request)."""
        idx = idx.to(self.positions.device)
        self.positions.index_fill_(0, idx, 0)
        self.keys.index_fill_(1, idx, 0)
        self.values.index_fill_(1, idx, 0)
        for tail in self.conv_tails:
            tail.index_fill_(0, idx, 0)


# ----------------------------------------------------------------------------------------------
# the model


class CodecDecoder(nn.Module):
    """Codes [B, T, num_quantizers] -> waveform [B, T * samples_per_frame] at 24 kHz."""

    def __init__(self, config: CodecDecoderConfig):
        super().__init__()
        self.config = config
        # Registration order is forward order: `_stateful_convs` relies on it.
        self.codebooks = ResidualCodebooks(config)
        self.pre_conv = CausalConv1d(config.codebook_dim, config.latent_dim, PRE_CONV_KERNEL)
        self.transformer = DecoderTransformer(config)
        self.upsample_stages = nn.ModuleList(UpsampleStage(config.latent_dim, r) for r in config.upsampling_ratios)
        self.vocoder_input_conv = CausalConv1d(config.latent_dim, config.decoder_dim, CONV_KERNEL)
        channels = [config.decoder_dim // 2**i for i in range(len(config.upsample_rates) + 1)]
        self.vocoder_blocks = nn.ModuleList(
            VocoderBlock(channels[i], channels[i + 1], r) for i, r in enumerate(config.upsample_rates)
        )
        self.output_snake = SnakeBeta(channels[-1])
        self.output_conv = CausalConv1d(channels[-1], 1, CONV_KERNEL)
        self._compiled_decode = None  # compile_whole

    # -- construction and weights ---------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls, model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> "CodecDecoder":
        """Decoder of a Qwen3-TTS checkpoint directory (or of its `speech_tokenizer/` directory)."""
        config = CodecDecoderConfig.from_model_dir(model_dir)
        weights_path = speech_tokenizer_dir(model_dir) / "model.safetensors"
        if not weights_path.is_file():
            raise CheckpointError(f"missing codec weights {weights_path}")
        with torch.device(device):
            model = cls(config)
        model.to(dtype=dtype)
        model.load_weights(read_decoder_weights(weights_path))
        return model.eval().requires_grad_(False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (names relative to `decoder.`) into the parameters.

        Every name must be known and every parameter must be filled; the return value
        is the set of checkpoint names consumed.
        """
        targets = checkpoint_name_map(self.config)
        params = {name: p.data for name, p in self.named_parameters()}
        untargeted = set(params) - {t.param for t in targets.values()}
        if untargeted:  # a construction / mapping mismatch, not a checkpoint problem
            raise RuntimeError(f"codec decoder parameters without a checkpoint source: {sorted(untargeted)}")
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if name in ENCODE_ONLY_WEIGHTS:
                loaded.add(name)
                continue
            target = targets.get(name)
            if target is None:
                unexpected.append(name)
                continue
            dest = target.of(params)
            if tuple(dest.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"codec decoder weight {name}: checkpoint shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)} (config and weights disagree)"
                )
            dest.copy_(tensor)
            loaded.add(name)
        if unexpected:
            raise CheckpointError(f"unexpected codec decoder weights: {sorted(unexpected)}")
        missing = (set(targets) | ENCODE_ONLY_WEIGHTS) - loaded
        if missing:
            raise CheckpointError(f"codec decoder checkpoint lacks {len(missing)} weights: {sorted(missing)}")
        return loaded

    # -- streaming --------------------------------------------------------------------------------

    def compile_whole(self, enabled: bool = True) -> None:
        """torch.compile `decode_chunk` as one graph (`enabled=False`: back to eager), so the
        elementwise work around the convolutions (SnakeBeta, the causal carries, residual adds,
        norms, the ragged state cuts) fuses into the kernels that produce it. One compilation,
        dynamic in the batch size and the chunk length, serves every call with at least
        `MIN_COMPILED_SIZE` streams and frames; smaller calls run eagerly (compiling a size-1
        specialisation took minutes). Compiles lazily, on the first such call."""
        self._compiled_decode = torch.compile(self._decode_chunk) if enabled else None

    def use_channels_last(self) -> None:
        """Run every conv and transposed conv as a 2-D one on channels-last tensors, the layout
        cuDNN's tensor-core kernels take: in the decoder's own layout cuDNN converts each conv's
        input and output. The activations between convs stay channels-last. Call after loading
        weights."""
        for m in self.modules():
            if isinstance(m, (CausalConv1d, CausalConvTranspose1d)) and not m.channels_last:
                store_channels_last(m.weight)
                m.channels_last = True

    def _stateful_convs(self) -> list[CausalConv1d | CausalConvTranspose1d]:
        return [
            m for m in self.modules() if isinstance(m, (CausalConv1d, CausalConvTranspose1d)) and m.context > 0
        ]

    def new_stream_state(self, batch_size: int) -> DecoderStreamState:
        """State of `batch_size` streams that have decoded nothing yet."""
        c = self.config
        ref = self.pre_conv.weight
        kv_shape = (c.num_hidden_layers, batch_size, c.num_key_value_heads, c.kv_cache_len, c.head_dim)
        return DecoderStreamState(
            positions=torch.zeros(batch_size, dtype=torch.int64, device=ref.device),
            keys=ref.new_zeros(kv_shape),
            values=ref.new_zeros(kv_shape),
            conv_tails=[ref.new_zeros(batch_size, m.in_channels, m.context) for m in self._stateful_convs()],
        )

    def decode_chunk(
        self, codes: torch.Tensor, state: DecoderStreamState, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DecoderStreamState]:
        """Decode the next `n` frames of B streams: codes [B, n, Q] (>= 0) -> samples [B, n * 1920].

        `state` (B rows, each stream at its own position) is advanced in place and returned.
        The samples equal those of a single pass over each stream's whole history.

        A ragged batch passes `lengths` [B] (int64, on the device): row b then holds only its
        first `lengths[b]` frames, followed by padding; its state advances by those frames
        alone, and only its first `lengths[b] * 1920` samples are meaningful.
        """
        if codes.dim() != 3 or codes.shape[-1] != self.config.num_quantizers:
            raise ValueError(f"codes must be [B, n, {self.config.num_quantizers}], got {tuple(codes.shape)}")
        if codes.shape[0] != state.batch_size:
            raise ValueError(f"codes hold {codes.shape[0]} streams but the state holds {state.batch_size}")
        if self._compiled_decode is not None and min(codes.shape[:2]) >= MIN_COMPILED_SIZE:
            if lengths is None:  # one compiled graph: the ragged one serves equal lengths too
                lengths = torch.full((codes.shape[0],), codes.shape[1], dtype=torch.int64, device=codes.device)
            mark_batch_and_length_dynamic(codes, state, lengths)
            return self._compiled_decode(codes, state, lengths)
        return self._decode_chunk(codes, state, lengths)

    def _decode_chunk(
        self, codes: torch.Tensor, state: DecoderStreamState, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, DecoderStreamState]:
        carry = ConvCarry(state.conv_tails, codes.shape[1], lengths)

        x = self.pre_conv.forward_chunk(self.codebooks(codes), carry)
        x = self.transformer(x.transpose(1, 2), state, lengths).transpose(1, 2)
        for stage in self.upsample_stages:
            x = stage.forward_chunk(x, carry)
        x = self.vocoder_input_conv.forward_chunk(x, carry)
        for block in self.vocoder_blocks:
            x = block.forward_chunk(x, carry)
        x = self.output_conv.forward_chunk(self.output_snake(x), carry)

        if len(carry.tails_out) != len(state.conv_tails):
            raise RuntimeError("conv state bookkeeping is out of order")
        for tail, new in zip(state.conv_tails, carry.tails_out):
            tail.copy_(new)
        state.positions.add_(codes.shape[1] if lengths is None else lengths)
        return x.squeeze(1).clamp(min=-1, max=1), state

    # -- whole utterances -------------------------------------------------------------------------

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """One causal pass over whole utterances: codes [B, T, Q] (>= 0) -> [B, T * 1920]."""
        audio, _ = self.decode_chunk(codes, self.new_stream_state(codes.shape[0]))
        return audio

    def chunked_forward(
        self,
        codes: torch.Tensor,
        chunk_frames: int = OFFICIAL_CHUNK_FRAMES,
        left_context_frames: int = OFFICIAL_LEFT_CONTEXT_FRAMES,
    ) -> torch.Tensor:
        """The official long-utterance scheme: independent passes over `chunk_frames`-frame
        pieces, each preceded by up to `left_context_frames` frames whose audio is discarded.
        Positions restart at every piece, so beyond the first chunk this differs slightly from
        `forward`; it is what the reference decoder outputs."""
        total = codes.shape[1]
        spf = self.config.samples_per_frame
        pieces = [self.pre_conv.weight.new_zeros(codes.shape[0], 0)]  # so that T = 0 yields empty audio
        for start in range(0, total, chunk_frames):
            end = min(start + chunk_frames, total)
            # mirrors the reference condition exactly (strictly greater), including its edge cases
            context = left_context_frames if start - left_context_frames > 0 else start
            audio = self.forward(codes[:, start - context : end])
            pieces.append(audio[:, context * spf :])
        return torch.cat(pieces, dim=1)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Official decode: codes [B, T, Q], right-padded with -1 (see `pad_codes`) -> per-item
        float32 waveforms of `valid_frames * 1920` samples."""
        if codes.dim() != 3 or codes.shape[-1] != self.config.num_quantizers:
            raise ValueError(f"codes must be [B, T, {self.config.num_quantizers}], got {tuple(codes.shape)}")
        lengths = ((codes[..., 0] > PAD_CODE).sum(dim=1) * self.config.samples_per_frame).tolist()
        audio = self.chunked_forward(codes.clamp(min=0))
        return [a[:n].float() for a, n in zip(audio, lengths)]


# Smallest batch size and chunk length `compile_whole`'s compilation serves (torch.compile
# specialises sizes 0 and 1, so they would each need a compilation of their own).
MIN_COMPILED_SIZE = 2


def mark_batch_and_length_dynamic(codes: torch.Tensor, state: DecoderStreamState, lengths: torch.Tensor | None) -> None:
    """Tell torch.compile which sizes vary between calls (the batch, the chunk length) so that
    it compiles once for all of them instead of once per shape."""
    mark = torch._dynamo.maybe_mark_dynamic
    mark(codes, 0)
    mark(codes, 1)
    mark(state.positions, 0)
    mark(state.keys, 1)
    mark(state.values, 1)
    for tail in state.conv_tails:
        mark(tail, 0)
    if lengths is not None:
        mark(lengths, 0)


def pad_codes(items: list[torch.Tensor]) -> torch.Tensor:
    """Per-utterance codes [T_b, Q] -> [B, max T_b, Q], right-padded with -1 as the official decode does."""
    return nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=PAD_CODE)


# ----------------------------------------------------------------------------------------------
# checkpoint layout


# The RVQ input projections only serve encoding (they live in the decoder's quantizer in the
# official layout); the encoder loads its own copy.
ENCODE_ONLY_WEIGHTS = frozenset({"quantizer.rvq_first.input_proj.weight", "quantizer.rvq_rest.input_proj.weight"})


def checkpoint_name_map(config: CodecDecoderConfig) -> dict[str, WeightTarget]:
    """Checkpoint name (relative to `decoder.`) -> parameter of `CodecDecoder`, for every tensor."""
    out: dict[str, WeightTarget] = {}

    def add(ckpt: str, param: str, index: int | slice | None = None) -> None:
        out[ckpt] = WeightTarget(param, index)

    def conv(ckpt: str, module: str) -> None:
        add(f"{ckpt}.conv.weight", f"{module}.weight")
        add(f"{ckpt}.conv.bias", f"{module}.bias")

    def snake(ckpt: str, module: str) -> None:
        add(f"{ckpt}.alpha", f"{module}.log_alpha")
        add(f"{ckpt}.beta", f"{module}.log_beta")

    for k in range(config.num_quantizers):
        group, j = ("rvq_first", k) if k < config.num_semantic_quantizers else ("rvq_rest", k - 1)
        book = f"quantizer.{group}.vq.layers.{j}._codebook"
        add(f"{book}.embedding_sum", "codebooks.embedding_sum", k)
        add(f"{book}.cluster_usage", "codebooks.cluster_usage", k)
    add("quantizer.rvq_first.output_proj.weight", "codebooks.semantic_output_proj")
    add("quantizer.rvq_rest.output_proj.weight", "codebooks.acoustic_output_proj")
    conv("pre_conv", "pre_conv")

    transformer = {f"transformer.{name}": f"pre_transformer.{name}" for name in
                   ("input_proj.weight", "input_proj.bias", "output_proj.weight", "output_proj.bias", "norm.weight")}
    for i in range(config.num_hidden_layers):
        ckpt, mine = f"pre_transformer.layers.{i}", f"transformer.layers.{i}"
        for param, name in (("attn_norm.weight", "input_layernorm.weight"),
                            ("mlp_norm.weight", "post_attention_layernorm.weight"),
                            ("attn.qkv_proj.weight", "self_attn.qkv_proj.weight"),  # q, k, v in the checkpoint
                            ("attn.o_proj.weight", "self_attn.o_proj.weight"),
                            ("attn_layer_scale", "self_attn_layer_scale.scale"),
                            ("mlp.gate_up_proj.weight", "mlp.gate_up_proj.weight"),  # gate, up in the checkpoint
                            ("mlp.down_proj.weight", "mlp.down_proj.weight"),
                            ("mlp_layer_scale", "mlp_layer_scale.scale")):
            transformer[f"{mine}.{param}"] = f"{ckpt}.{name}"
    rows = stacked_shard_rows(config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                              config.intermediate_size)
    out.update(stacked_name_map(transformer, rows))

    for i in range(len(config.upsampling_ratios)):
        ckpt, mine = f"upsample.{i}", f"upsample_stages.{i}"
        conv(f"{ckpt}.0", f"{mine}.upsample")
        conv(f"{ckpt}.1.dwconv", f"{mine}.convnext.depthwise_conv")
        for src, dst in (("norm", "norm"), ("pwconv1", "pointwise_in"), ("pwconv2", "pointwise_out")):
            add(f"{ckpt}.1.{src}.weight", f"{mine}.convnext.{dst}.weight")
            add(f"{ckpt}.1.{src}.bias", f"{mine}.convnext.{dst}.bias")
        add(f"{ckpt}.1.gamma", f"{mine}.convnext.gamma")

    # the official vocoder is one flat list: input conv, the blocks, the final snake, the output conv
    conv("decoder.0", "vocoder_input_conv")
    num_blocks = len(config.upsample_rates)
    for b in range(num_blocks):
        ckpt, mine = f"decoder.{b + 1}.block", f"vocoder_blocks.{b}"
        snake(f"{ckpt}.0", f"{mine}.snake")
        conv(f"{ckpt}.1", f"{mine}.upsample")
        for u in range(len(RESIDUAL_DILATIONS)):
            unit_ckpt, unit = f"{ckpt}.{u + 2}", f"{mine}.residual_units.{u}"
            snake(f"{unit_ckpt}.act1", f"{unit}.snake_in")
            snake(f"{unit_ckpt}.act2", f"{unit}.snake_out")
            conv(f"{unit_ckpt}.conv1", f"{unit}.dilated_conv")
            conv(f"{unit_ckpt}.conv2", f"{unit}.pointwise_conv")
    snake(f"decoder.{num_blocks + 1}", "output_snake")
    conv(f"decoder.{num_blocks + 2}", "output_conv")
    return out


def read_decoder_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name relative to `decoder.`, tensor) for the decoder's tensors in a speech tokenizer
    safetensors file; the encoder's (`encoder.`) are left alone."""
    prefix = "decoder."
    weights = read_safetensors(path, prefix, strip_prefix=True, what="codec weights")
    first = next(weights, None)
    if first is None:
        raise CheckpointError(f"{path} holds no codec decoder weights (no '{prefix}*' tensors)")
    yield first
    yield from weights

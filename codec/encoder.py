"""Codec encoder of the 12 Hz speech tokenizer: 24 kHz waveform -> codes `[T, 16]` (Base / ICL only).

Architecturally the encoder half of Kyutai's Mimi (as in `transformers.MimiModel`):
a causal SEANet conv stack down to 25 Hz, a causal sliding-window transformer, a
stride-2 conv down to 12.5 Hz, then a split residual VQ (one semantic level, the rest
acoustic) of which only the first `encoder_valid_num_quantizers` levels are used.

Weights come from `speech_tokenizer/model.safetensors` under `encoder.` with Mimi's
names; `checkpoint_name_map` spells out the correspondence with the modules here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vllm_qwen3tts.base.config import CODEC_MODEL_TYPE, CheckpointError, read_json
from vllm_qwen3tts.model.layers import LayerScale, apply_rope, rope_cos_sin, rope_inv_freq
from vllm_qwen3tts.base.weight_loading import copy_tensors, read_safetensors

WEIGHT_PREFIX = "encoder."


@dataclass(frozen=True)
class CodecEncoderConfig:
    sample_rate: int
    samples_per_frame: int  # 1920: one 12.5 Hz code frame
    num_valid_quantizers: int  # levels kept (16); the checkpoint holds more
    # SEANet
    num_filters: int
    kernel_size: int
    residual_kernel_size: int
    last_kernel_size: int
    num_residual_layers: int
    dilation_growth_rate: int
    compress: int
    strides: tuple[int, ...]  # in application order (Mimi's upsampling_ratios reversed)
    pad_mode: str
    # transformer at the SEANet rate
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    sliding_window: int
    attention_bias: bool
    # SEANet rate -> code rate
    downsample_stride: int
    # quantizer
    codebook_size: int
    codebook_dim: int
    num_semantic_quantizers: int
    num_quantizers: int  # levels stored in the checkpoint

    @classmethod
    def from_speech_tokenizer_config(cls, cfg: dict[str, Any]) -> "CodecEncoderConfig":
        if cfg.get("model_type") != CODEC_MODEL_TYPE:
            raise CheckpointError(
                f"speech_tokenizer/config.json has model_type {cfg.get('model_type')!r}; expected {CODEC_MODEL_TYPE!r}"
            )
        enc = cfg["encoder_config"]
        unsupported = {
            "use_causal_conv": (enc.get("use_causal_conv", True), True),
            "use_conv_shortcut": (enc.get("use_conv_shortcut", False), False),
            "audio_channels": (enc.get("audio_channels", 1), 1),
            "hidden_act": (enc.get("hidden_act", "gelu"), "gelu"),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise CheckpointError(f"encoder_config.{key} = {value!r} is not supported (only {supported!r})")
        strides = tuple(int(r) for r in reversed(enc["upsampling_ratios"]))
        seanet_hop = math.prod(strides)
        samples_per_frame = int(cfg["encode_downsample_rate"])
        if samples_per_frame % seanet_hop:
            raise CheckpointError(
                f"encode_downsample_rate {samples_per_frame} is not a multiple of the SEANet hop {seanet_hop}"
            )
        rope_theta = enc.get("rope_theta") or (enc.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        num_heads = int(enc["num_attention_heads"])
        codebook_dim = int(enc.get("codebook_dim") or enc["hidden_size"])
        if int(enc.get("vector_quantization_hidden_dimension") or codebook_dim) != codebook_dim:
            raise CheckpointError("encoder_config: vector_quantization_hidden_dimension must equal codebook_dim")
        config = cls(
            sample_rate=int(cfg.get("input_sample_rate", enc.get("sampling_rate", 24000))),
            samples_per_frame=samples_per_frame,
            num_valid_quantizers=int(cfg["encoder_valid_num_quantizers"]),
            num_filters=int(enc["num_filters"]),
            kernel_size=int(enc["kernel_size"]),
            residual_kernel_size=int(enc["residual_kernel_size"]),
            last_kernel_size=int(enc["last_kernel_size"]),
            num_residual_layers=int(enc["num_residual_layers"]),
            dilation_growth_rate=int(enc["dilation_growth_rate"]),
            compress=int(enc["compress"]),
            strides=strides,
            pad_mode=str(enc.get("pad_mode", "constant")),
            hidden_size=int(enc["hidden_size"]),
            num_layers=int(enc["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(enc.get("num_key_value_heads") or num_heads),
            head_dim=int(enc.get("head_dim") or int(enc["hidden_size"]) // num_heads),
            intermediate_size=int(enc["intermediate_size"]),
            norm_eps=float(enc.get("norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            sliding_window=int(enc["sliding_window"]),
            attention_bias=bool(enc.get("attention_bias", False)),
            downsample_stride=samples_per_frame // seanet_hop,
            codebook_size=int(enc["codebook_size"]),
            codebook_dim=codebook_dim,
            num_semantic_quantizers=int(enc.get("num_semantic_quantizers", 1)),
            num_quantizers=int(enc["num_quantizers"]),
        )
        if not config.num_semantic_quantizers < config.num_valid_quantizers <= config.num_quantizers:
            raise CheckpointError(
                f"encoder_valid_num_quantizers {config.num_valid_quantizers} must lie in "
                f"({config.num_semantic_quantizers}, {config.num_quantizers}]"
            )
        return config


# ------------------------------------------------------------------------------------------
# SEANet


class CausalConv1d(nn.Module):
    """Conv1d that only looks back: left-pads `kernel - stride`, and right-pads the few
    samples that make the length a multiple of the stride, so `T -> ceil(T / stride)`."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
        bias: bool = True, pad_mode: str = "constant",
    ):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, bias=bias)
        self.stride = stride
        self.left_pad = (kernel_size - 1) * dilation + 1 - stride
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        right_pad = -(-length // self.stride) * self.stride - length
        return self.conv(F.pad(x, (self.left_pad, right_pad), mode=self.pad_mode))


class ResidualUnit(nn.Module):
    """x + conv_k1(ELU(conv_k(ELU(x)))), the inner width reduced by `compress`."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, dilation: int, pad_mode: str):
        super().__init__()
        self.conv1 = CausalConv1d(channels, hidden, kernel_size, dilation=dilation, pad_mode=pad_mode)
        self.conv2 = CausalConv1d(hidden, channels, 1, pad_mode=pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class SeanetStage(nn.Module):
    """Residual units at one rate, then ELU and a strided conv that doubles the channels."""

    def __init__(self, config: CodecEncoderConfig, channels: int, stride: int):
        super().__init__()
        self.residual_units = nn.ModuleList(
            ResidualUnit(
                channels, channels // config.compress, config.residual_kernel_size,
                config.dilation_growth_rate**j, config.pad_mode,
            )
            for j in range(config.num_residual_layers)
        )
        self.downsample = CausalConv1d(channels, 2 * channels, 2 * stride, stride=stride, pad_mode=config.pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.residual_units:
            x = unit(x)
        return self.downsample(F.elu(x))


class SeanetEncoder(nn.Module):
    """`[B, 1, samples]` -> `[B, hidden, ceil(samples / prod(strides))]`."""

    def __init__(self, config: CodecEncoderConfig):
        super().__init__()
        self.input_conv = CausalConv1d(1, config.num_filters, config.kernel_size, pad_mode=config.pad_mode)
        self.stages = nn.ModuleList(
            SeanetStage(config, config.num_filters * 2**i, stride) for i, stride in enumerate(config.strides)
        )
        self.output_conv = CausalConv1d(
            config.num_filters * 2 ** len(config.strides), config.hidden_size, config.last_kernel_size,
            pad_mode=config.pad_mode,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_conv(x)
        for stage in self.stages:
            x = stage(x)
        return self.output_conv(F.elu(x))


# ------------------------------------------------------------------------------------------
# transformer


class SelfAttention(nn.Module):
    def __init__(self, config: CodecEncoderConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        if length <= self.sliding_window:
            # the window cannot bite: plain causal, which lets SDPA skip building a mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            query_pos = torch.arange(length, device=x.device)[:, None]
            key_pos = torch.arange(length, device=x.device)[None, :]
            visible = (key_pos <= query_pos) & (key_pos > query_pos - self.sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: CodecEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm (LayerNorm) attention and MLP, each residual branch scaled per channel."""

    def __init__(self, config: CodecEncoderConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = SelfAttention(config)
        self.self_attn_layer_scale = LayerScale(config.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_layer_scale = LayerScale(config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class EncoderTransformer(nn.Module):
    """`[B, T, hidden]` -> same; causal, attention limited to the last `sliding_window` frames."""

    def __init__(self, config: CodecEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        # A plain attribute, not a buffer: module.to(bf16) must not round the frequencies.
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq.to(x.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


# ------------------------------------------------------------------------------------------
# residual vector quantizer


class Codebook(nn.Module):
    """EMA-style codebook: entries are `embed_sum / cluster_usage`, kept as the stored statistics."""

    epsilon = 1e-5

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("embed_sum", torch.zeros(size, dim))
        self.register_buffer("cluster_usage", torch.ones(size))

    def entries(self) -> torch.Tensor:
        # evaluated in the buffer dtype, like the reference (matters for bf16 bit parity)
        return self.embed_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]


class ResidualVectorQuantizer(nn.Module):
    """1x1 projection, then per level: nearest entry (Euclidean, fp32), subtract, next level."""

    def __init__(self, config: CodecEncoderConfig, num_levels: int):
        super().__init__()
        self.input_proj = nn.Conv1d(config.hidden_size, config.codebook_dim, 1, bias=False)
        self.codebooks = nn.ModuleList(Codebook(config.codebook_size, config.codebook_dim) for _ in range(num_levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, hidden, T]` -> codes `[B, levels, T]`."""
        residual = self.input_proj(x).transpose(1, 2)  # [B, T, dim]
        batch, length, dim = residual.shape
        codes = []
        for codebook in self.codebooks:
            entries = codebook.entries()
            # torch.cdist, like the reference: its matmul-based distance decides near-ties
            distances = torch.cdist(residual.reshape(1, -1, dim).float(), entries[None].float())[0]
            indices = distances.argmin(dim=-1).view(batch, length)
            residual = residual - F.embedding(indices, entries)
            codes.append(indices)
        return torch.stack(codes, dim=1)


# ------------------------------------------------------------------------------------------


class CodecEncoder(nn.Module):
    """24 kHz mono waveform -> 12.5 Hz codes, `num_valid_quantizers` levels per frame."""

    def __init__(self, config: CodecEncoderConfig):
        super().__init__()
        self.config = config
        self.seanet = SeanetEncoder(config)
        self.transformer = EncoderTransformer(config)
        stride = config.downsample_stride
        # replicate padding here (zeros elsewhere): Mimi's choice for the rate-halving conv
        self.downsample = CausalConv1d(
            config.hidden_size, config.hidden_size, 2 * stride, stride=stride, bias=False, pad_mode="replicate"
        )
        # Both RVQs start from the same downsampled features (no residual across the split).
        self.semantic_rvq = ResidualVectorQuantizer(config, config.num_semantic_quantizers)
        self.acoustic_rvq = ResidualVectorQuantizer(
            config, config.num_valid_quantizers - config.num_semantic_quantizers
        )

    @property
    def device(self) -> torch.device:
        return self.downsample.conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.downsample.conv.weight.dtype

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """`[B, samples]` -> codes `[B, num_valid_quantizers, ceil(samples / samples_per_frame)]`."""
        features = self.seanet(waveform.unsqueeze(1))
        features = self.transformer(features.transpose(1, 2)).transpose(1, 2)
        features = self.downsample(features)
        return torch.cat([self.semantic_rvq(features), self.acoustic_rvq(features)], dim=1)

    @torch.inference_mode()
    def encode(self, wavs: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Mono float32 waveforms at 24 kHz -> one LongTensor `[ceil(n_i / 1920), 16]` each, on the CPU.

        One batched forward, right-padded with zeros. The encoder is causal, so padding only
        reaches an item's last kept frame (whose window covers the padding instead of the
        conv's own right padding); every earlier frame equals a single-item encode.
        """
        if len(wavs) == 0:
            return []
        lengths = []
        for i, wav in enumerate(wavs):
            if np.ndim(wav) != 1:
                raise ValueError(f"waveform {i}: expected shape [samples], got {np.shape(wav)}")
            if len(wav) == 0:
                raise ValueError(f"waveform {i} is empty")
            lengths.append(len(wav))
        batch = np.zeros((len(wavs), max(lengths)), dtype=np.float32)
        for row, wav in zip(batch, wavs):
            row[: len(wav)] = wav
        # the waveform is rounded to the model dtype first, as the reference does
        waveform = torch.from_numpy(batch).to(device=self.device, dtype=self.dtype)
        codes = self.forward(waveform).cpu()
        frame = self.config.samples_per_frame
        return [codes[i, :, : -(-n // frame)].transpose(0, 1).contiguous() for i, n in enumerate(lengths)]

    def load_weights(self, checkpoint: dict[str, torch.Tensor]) -> None:
        """Copy tensors by `checkpoint_name_map`; every module tensor must be present with its
        shape, and every checkpoint tensor must be either consumed or known to be decode-only /
        beyond the kept levels."""
        own = self.state_dict()
        name_map = checkpoint_name_map(self.config)
        if set(name_map.values()) != set(own):
            raise AssertionError("checkpoint_name_map is out of sync with the module tree")
        copy_tensors(own, checkpoint, name_map, what="codec encoder",
                     accept_unmapped=lambda n: _is_unused_encoder_tensor(n, self.config))


def checkpoint_name_map(config: CodecEncoderConfig) -> dict[str, str]:
    """Checkpoint tensor name (Mimi layout, `encoder.` prefix) -> this module's state-dict name."""
    names: dict[str, str] = {}

    def conv(checkpoint_path: str, module_path: str, bias: bool = True) -> None:
        names[f"{checkpoint_path}.weight"] = f"{module_path}.weight"
        if bias:
            names[f"{checkpoint_path}.bias"] = f"{module_path}.bias"

    # Mimi keeps the SEANet in one flat list in which every ELU also takes an index.
    seanet = "encoder.encoder.layers"
    conv(f"{seanet}.0.conv", "seanet.input_conv.conv")
    index = 1
    for s in range(len(config.strides)):
        for u in range(config.num_residual_layers):
            conv(f"{seanet}.{index}.block.1.conv", f"seanet.stages.{s}.residual_units.{u}.conv1.conv")
            conv(f"{seanet}.{index}.block.3.conv", f"seanet.stages.{s}.residual_units.{u}.conv2.conv")
            index += 1
        index += 1  # ELU
        conv(f"{seanet}.{index}.conv", f"seanet.stages.{s}.downsample.conv")
        index += 1
    index += 1  # ELU
    conv(f"{seanet}.{index}.conv", "seanet.output_conv.conv")

    for i in range(config.num_layers):
        ours, theirs = f"transformer.layers.{i}", f"encoder.encoder_transformer.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            conv(f"{theirs}.{norm}", f"{ours}.{norm}")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            conv(f"{theirs}.self_attn.{proj}", f"{ours}.self_attn.{proj}", bias=config.attention_bias)
        for fc in ("fc1", "fc2"):
            conv(f"{theirs}.mlp.{fc}", f"{ours}.mlp.{fc}", bias=False)
        for scale in ("self_attn_layer_scale", "mlp_layer_scale"):
            names[f"{theirs}.{scale}.scale"] = f"{ours}.{scale}.scale"

    conv("encoder.downsample.conv", "downsample.conv", bias=False)

    levels = {
        "semantic": config.num_semantic_quantizers,
        "acoustic": config.num_valid_quantizers - config.num_semantic_quantizers,
    }
    for kind, num_levels in levels.items():
        ours, theirs = f"{kind}_rvq", f"encoder.quantizer.{kind}_residual_vector_quantizer"
        conv(f"{theirs}.input_proj", f"{ours}.input_proj", bias=False)
        for k in range(num_levels):
            for stat in ("embed_sum", "cluster_usage"):
                names[f"{theirs}.layers.{k}.codebook.{stat}"] = f"{ours}.codebooks.{k}.{stat}"
    return names


def _is_unused_encoder_tensor(name: str, config: CodecEncoderConfig) -> bool:
    """Stored but not needed to encode: the RVQ output projections and `initialized` flags
    (decode / training only) and the acoustic levels past `encoder_valid_num_quantizers`."""
    quantizer = "encoder.quantizer."
    if not name.startswith(quantizer):
        return False
    kind, _, rest = name[len(quantizer):].partition(".")
    if kind not in ("semantic_residual_vector_quantizer", "acoustic_residual_vector_quantizer"):
        return False
    if rest == "output_proj.weight" or rest.endswith(".codebook.initialized"):
        return True
    if kind == "acoustic_residual_vector_quantizer" and rest.startswith("layers."):
        level = int(rest.split(".")[1])
        stored = config.num_quantizers - config.num_semantic_quantizers
        return config.num_valid_quantizers - config.num_semantic_quantizers <= level < stored
    return False


def read_codec_encoder_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The `encoder.*` tensors of a checkpoint directory's speech tokenizer, by checkpoint name."""
    path = Path(model_dir) / "speech_tokenizer" / "model.safetensors"
    return dict(read_safetensors(path, WEIGHT_PREFIX, what="codec encoder weights"))


def load_codec_encoder(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> CodecEncoder:
    """The codec encoder of a Qwen3-TTS checkpoint directory, in eval mode on `device` / `dtype`."""
    config = CodecEncoderConfig.from_speech_tokenizer_config(
        read_json(Path(model_dir) / "speech_tokenizer" / "config.json")
    )
    weights = read_codec_encoder_weights(model_dir)
    if not weights:
        raise CheckpointError(
            f"{model_dir}/speech_tokenizer/model.safetensors holds no {WEIGHT_PREFIX}* tensors "
            "(the codec encoder is needed for voice cloning)"
        )
    encoder = CodecEncoder(config)
    encoder.load_weights(weights)
    return encoder.to(device=device, dtype=dtype).eval()

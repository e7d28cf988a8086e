"""`make-checkpoint`: random-weight Qwen3-TTS checkpoints in the released layout.

No real weights can be downloaded here, so correctness is judged against the
official implementation on the *same* random weights. `full` reproduces the
released geometry (for GPU benchmarks); `tiny` keeps every structural feature
(GQA, q/k norm, an explicit head_dim that differs from hidden/heads, the full
text vocabulary, all special ids, 16 codebooks, the codec's rates and windows)
with small widths and depths so CPU tests run in seconds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("0.6b-base", "0.6b-custom_voice", "1.7b-base", "1.7b-custom_voice", "1.7b-voice_design")
SCALES = ("tiny", "full")

LANGUAGE_IDS = {
    "chinese": 2055, "english": 2050, "german": 2053, "italian": 2070, "portuguese": 2071,
    "spanish": 2054, "japanese": 2058, "korean": 2064, "french": 2061, "russian": 2069,
}
DIALECT_IDS = {"beijing_dialect": 2074, "sichuan_dialect": 2062}
SPEAKERS = {  # CustomVoice preset speakers: id, dialect
    "serena": (3066, False), "vivian": (3065, False), "uncle_fu": (3010, False), "ryan": (3061, False),
    "aiden": (2861, False), "ono_anna": (2873, False), "sohee": (2864, False),
    "eric": (2875, "sichuan_dialect"), "dylan": (2878, "beijing_dialect"),
}
TEXT_VOCAB_SIZE = 151936


@dataclass(frozen=True)
class Geometry:
    talker_hidden: int
    talker_inter: int
    talker_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    text_hidden: int
    cp_hidden: int
    cp_inter: int
    cp_layers: int
    spk_channels: tuple[int, ...]
    spk_attention: int
    spk_se: int
    # codec decoder
    dec_latent: int
    dec_dim: int
    dec_hidden: int
    dec_inter: int
    dec_layers: int
    dec_heads: int
    dec_head_dim: int
    dec_codebook_dim: int
    # codec encoder (Mimi)
    enc_filters: int
    enc_hidden: int
    enc_layers: int
    enc_heads: int
    enc_head_dim: int
    enc_inter: int
    enc_codebook_dim: int


def geometry(variant: str, scale: str) -> Geometry:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    big = variant.startswith("1.7b")
    if scale == "full":
        h = 2048 if big else 1024
        return Geometry(
            talker_hidden=h, talker_inter=3 * h, talker_layers=28, heads=16, kv_heads=8, head_dim=128,
            text_hidden=2048, cp_hidden=1024, cp_inter=3072, cp_layers=5,
            spk_channels=(512, 512, 512, 512, 1536), spk_attention=128, spk_se=128,
            dec_latent=1024, dec_dim=1536, dec_hidden=512, dec_inter=1024, dec_layers=8, dec_heads=16,
            dec_head_dim=64, dec_codebook_dim=512,
            enc_filters=64, enc_hidden=512, enc_layers=8, enc_heads=8, enc_head_dim=64, enc_inter=2048,
            enc_codebook_dim=256,
        )
    # tiny: head_dim 64 (the vLLM CPU attention needs >= 64) with 2 heads, so head_dim != hidden/heads;
    # the 1.7b talker is wider than the code predictor, so small_to_mtp_projection exists, as released.
    h = 128 if big else 64
    return Geometry(
        talker_hidden=h, talker_inter=2 * h, talker_layers=2, heads=2, kv_heads=1, head_dim=64,
        text_hidden=32, cp_hidden=64, cp_inter=128, cp_layers=2,
        spk_channels=(32, 32, 32, 32, 96), spk_attention=16, spk_se=16,
        dec_latent=64, dec_dim=96, dec_hidden=32, dec_inter=64, dec_layers=2, dec_heads=2,
        dec_head_dim=16, dec_codebook_dim=32,
        enc_filters=8, enc_hidden=32, enc_layers=2, enc_heads=2, enc_head_dim=16, enc_inter=64,
        enc_codebook_dim=16,
    )


# --------------------------------------------------------------------------------------------
# config files


def model_config(variant: str, scale: str) -> dict:
    g = geometry(variant, scale)
    size, kind = variant.split("-", 1)
    custom = kind == "custom_voice"
    languages = dict(LANGUAGE_IDS)
    if custom:
        languages.update(DIALECT_IDS)
    talker = {
        "model_type": "qwen3_tts_talker",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": g.talker_hidden,
        "intermediate_size": g.talker_inter,
        "num_hidden_layers": g.talker_layers,
        "num_attention_heads": g.heads,
        "num_key_value_heads": g.kv_heads,
        "head_dim": g.head_dim,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 1000000,
        "sliding_window": None,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 3072,
        "text_vocab_size": TEXT_VOCAB_SIZE,
        "text_hidden_size": g.text_hidden,
        "num_code_groups": 16,
        "position_id_per_seconds": 13,
        "codec_pad_id": 2148,
        "codec_bos_id": 2149,
        "codec_eos_token_id": 2150,
        "codec_think_id": 2154,
        "codec_nothink_id": 2155,
        "codec_think_bos_id": 2156,
        "codec_think_eos_id": 2157,
        "codec_language_id": languages,
        "spk_id": {name: [sid] for name, (sid, _) in SPEAKERS.items()} if custom else {},
        "spk_is_dialect": {name: d for name, (_, d) in SPEAKERS.items()} if custom else {},
        "code_predictor_config": {
            "model_type": "qwen3_tts_talker_code_predictor",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "hidden_size": g.cp_hidden,
            "intermediate_size": g.cp_inter,
            "num_hidden_layers": g.cp_layers,
            "num_attention_heads": g.heads,
            "num_key_value_heads": g.kv_heads,
            "head_dim": g.head_dim,
            "initializer_range": 0.02,
            "layer_types": ["full_attention"] * g.cp_layers,
            "max_length": 20,
            "max_position_embeddings": 65536,
            "max_window_layers": 28,
            "num_code_groups": 16,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": None,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 2048,
        },
    }
    cfg = {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "tts_model_size": "1b7" if size == "1.7b" else "0b6",
        "tts_model_type": kind,
        "im_start_token_id": 151644,
        "im_end_token_id": 151645,
        "assistant_token_id": 77091,
        "tts_pad_token_id": 151671,
        "tts_bos_token_id": 151672,
        "tts_eos_token_id": 151673,
        "talker_config": talker,
        "speaker_encoder_config": {
            "mel_dim": 128,
            "enc_dim": g.talker_hidden,
            "enc_channels": list(g.spk_channels),
            "enc_kernel_sizes": [5, 3, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": g.spk_attention,
            "enc_res2net_scale": 8,
            "enc_se_channels": g.spk_se,
            "sample_rate": 24000,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.3",
    }
    return cfg


def generation_config() -> dict:
    return {
        "do_sample": True,
        "repetition_penalty": 1.05,
        "temperature": 0.9,
        "top_p": 1.0,
        "top_k": 50,
        "subtalker_dosample": True,
        "subtalker_temperature": 0.9,
        "subtalker_top_p": 1.0,
        "subtalker_top_k": 50,
        "max_new_tokens": 8192,
    }


def speech_tokenizer_config(scale: str) -> dict:
    g = geometry("0.6b-base", scale)
    return {
        "architectures": ["Qwen3TTSTokenizerV2Model"],
        "model_type": "qwen3_tts_tokenizer_12hz",
        "encoder_valid_num_quantizers": 16,
        "input_sample_rate": 24000,
        "output_sample_rate": 24000,
        "encode_downsample_rate": 1920,
        "decode_upsample_rate": 1920,
        "decoder_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "codebook_dim": g.dec_codebook_dim,
            "codebook_size": 2048,
            "decoder_dim": g.dec_dim,
            "head_dim": g.dec_head_dim,
            "hidden_act": "silu",
            "hidden_size": g.dec_hidden,
            "intermediate_size": g.dec_inter,
            "latent_dim": g.dec_latent,
            "layer_scale_initial_scale": 0.01,
            "max_position_embeddings": 8000,
            "num_attention_heads": g.dec_heads,
            "num_hidden_layers": g.dec_layers,
            "num_key_value_heads": g.dec_heads,
            "num_quantizers": 16,
            "num_semantic_quantizers": 1,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000,
            "semantic_codebook_size": 4096,
            "sliding_window": 72,
            "upsample_rates": [8, 5, 4, 3],
            "upsampling_ratios": [2, 2],
            "vector_quantization_hidden_dimension": g.dec_codebook_dim,
        },
        "encoder_config": {
            "_frame_rate": 12.5,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "audio_channels": 1,
            "codebook_dim": g.enc_codebook_dim,
            "codebook_size": 2048,
            "compress": 2,
            "dilation_growth_rate": 2,
            "head_dim": g.enc_head_dim,
            "hidden_act": "gelu",
            "hidden_size": g.enc_hidden,
            "initializer_range": 0.02,
            "intermediate_size": g.enc_inter,
            "kernel_size": 7,
            "last_kernel_size": 3,
            "layer_scale_initial_scale": 0.01,
            "max_position_embeddings": 8000,
            "model_type": "mimi",
            "norm_eps": 1e-05,
            "num_attention_heads": g.enc_heads,
            "num_filters": g.enc_filters,
            "num_hidden_layers": g.enc_layers,
            "num_key_value_heads": g.enc_heads,
            "num_quantizers": 32,
            "num_residual_layers": 1,
            "num_semantic_quantizers": 1,
            "pad_mode": "constant",
            "residual_kernel_size": 3,
            "rope_theta": 10000.0,
            "sampling_rate": 24000,
            "sliding_window": 250,
            "trim_right_ratio": 1.0,
            "upsample_groups": g.enc_hidden,
            "upsampling_ratios": [8, 6, 5, 4],
            "use_cache": False,
            "use_causal_conv": True,
            "use_conv_shortcut": False,
            "use_streaming": False,
            "vector_quantization_hidden_dimension": g.enc_codebook_dim,
        },
        "transformers_version": "4.57.3",
    }


SPEECH_PREPROCESSOR_CONFIG = {
    "chunk_length_s": None,
    "feature_extractor_type": "EncodecFeatureExtractor",
    "feature_size": 1,
    "overlap": None,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 24000,
}
PROCESSOR_CONFIG = {"processor_class": "Qwen3TTSProcessor"}


# --------------------------------------------------------------------------------------------
# weight layouts: name -> shape, mapped explicitly from the released layout


def _decoder_stack(prefix: str, hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int) -> dict:
    out = {}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        out.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    out[prefix + "norm.weight"] = (hidden,)
    return out


def talker_shapes(g: Geometry) -> dict[str, tuple[int, ...]]:
    h = g.talker_hidden
    out = {
        "talker.model.text_embedding.weight": (TEXT_VOCAB_SIZE, g.text_hidden),
        "talker.model.codec_embedding.weight": (3072, h),
        "talker.codec_head.weight": (3072, h),
        "talker.text_projection.linear_fc1.weight": (g.text_hidden, g.text_hidden),
        "talker.text_projection.linear_fc1.bias": (g.text_hidden,),
        "talker.text_projection.linear_fc2.weight": (h, g.text_hidden),
        "talker.text_projection.linear_fc2.bias": (h,),
    }
    out.update(_decoder_stack("talker.model.", h, g.talker_inter, g.talker_layers, g.heads, g.kv_heads, g.head_dim))
    cp = "talker.code_predictor."
    out.update(_decoder_stack(cp + "model.", g.cp_hidden, g.cp_inter, g.cp_layers, g.heads, g.kv_heads, g.head_dim))
    for j in range(15):
        out[f"{cp}model.codec_embedding.{j}.weight"] = (2048, h)
        out[f"{cp}lm_head.{j}.weight"] = (2048, g.cp_hidden)
    if h != g.cp_hidden:
        out[cp + "small_to_mtp_projection.weight"] = (g.cp_hidden, h)
        out[cp + "small_to_mtp_projection.bias"] = (g.cp_hidden,)
    return out


def speaker_encoder_shapes(g: Geometry) -> dict[str, tuple[int, ...]]:
    c = g.spk_channels
    kernels = (5, 3, 3, 3, 1)
    scale = 8
    p = "speaker_encoder."
    out = {p + "blocks.0.conv.weight": (c[0], 128, kernels[0]), p + "blocks.0.conv.bias": (c[0],)}
    for b in (1, 2, 3):
        ch, width = c[b], c[b] // scale
        q = f"{p}blocks.{b}."
        out.update({
            q + "tdnn1.conv.weight": (ch, c[b - 1], 1), q + "tdnn1.conv.bias": (ch,),
            q + "tdnn2.conv.weight": (ch, ch, 1), q + "tdnn2.conv.bias": (ch,),
            q + "se_block.conv1.weight": (g.spk_se, ch, 1), q + "se_block.conv1.bias": (g.spk_se,),
            q + "se_block.conv2.weight": (ch, g.spk_se, 1), q + "se_block.conv2.bias": (ch,),
        })
        for k in range(scale - 1):
            out[f"{q}res2net_block.blocks.{k}.conv.weight"] = (width, width, kernels[b])
            out[f"{q}res2net_block.blocks.{k}.conv.bias"] = (width,)
    out.update({
        p + "mfa.conv.weight": (c[4], sum(c[1:4]), 1), p + "mfa.conv.bias": (c[4],),
        p + "asp.tdnn.conv.weight": (g.spk_attention, 3 * c[4], 1), p + "asp.tdnn.conv.bias": (g.spk_attention,),
        p + "asp.conv.weight": (c[4], g.spk_attention, 1), p + "asp.conv.bias": (c[4],),
        p + "fc.weight": (g.talker_hidden, 2 * c[4], 1), p + "fc.bias": (g.talker_hidden,),
    })
    return out


def codec_decoder_shapes(g: Geometry) -> dict[str, tuple[int, ...]]:
    half = g.dec_codebook_dim // 2
    lat, hid = g.dec_latent, g.dec_hidden
    p = "decoder."
    out: dict[str, tuple[int, ...]] = {}
    for name, n in (("rvq_first", 1), ("rvq_rest", 15)):
        q = f"{p}quantizer.{name}."
        out[q + "input_proj.weight"] = (half, g.dec_codebook_dim, 1)
        out[q + "output_proj.weight"] = (g.dec_codebook_dim, half, 1)
        for k in range(n):
            out[f"{q}vq.layers.{k}._codebook.cluster_usage"] = (2048,)
            out[f"{q}vq.layers.{k}._codebook.embedding_sum"] = (2048, half)
    out[p + "pre_conv.conv.weight"] = (lat, g.dec_codebook_dim, 3)
    out[p + "pre_conv.conv.bias"] = (lat,)
    t = p + "pre_transformer."
    out[t + "input_proj.weight"] = (hid, lat)
    out[t + "input_proj.bias"] = (hid,)
    out[t + "output_proj.weight"] = (lat, hid)
    out[t + "output_proj.bias"] = (lat,)
    out[t + "norm.weight"] = (hid,)
    qkv = g.dec_heads * g.dec_head_dim
    for i in range(g.dec_layers):
        q = f"{t}layers.{i}."
        out.update({
            q + "input_layernorm.weight": (hid,), q + "post_attention_layernorm.weight": (hid,),
            q + "self_attn.q_proj.weight": (qkv, hid), q + "self_attn.k_proj.weight": (qkv, hid),
            q + "self_attn.v_proj.weight": (qkv, hid), q + "self_attn.o_proj.weight": (hid, qkv),
            q + "mlp.gate_proj.weight": (g.dec_inter, hid), q + "mlp.up_proj.weight": (g.dec_inter, hid),
            q + "mlp.down_proj.weight": (hid, g.dec_inter),
            q + "self_attn_layer_scale.scale": (hid,), q + "mlp_layer_scale.scale": (hid,),
        })
    for i in range(2):
        q = f"{p}upsample.{i}."
        out.update({
            q + "0.conv.weight": (lat, lat, 2), q + "0.conv.bias": (lat,),
            q + "1.dwconv.conv.weight": (lat, 1, 7), q + "1.dwconv.conv.bias": (lat,),
            q + "1.norm.weight": (lat,), q + "1.norm.bias": (lat,), q + "1.gamma": (lat,),
            q + "1.pwconv1.weight": (4 * lat, lat), q + "1.pwconv1.bias": (4 * lat,),
            q + "1.pwconv2.weight": (lat, 4 * lat), q + "1.pwconv2.bias": (lat,),
        })
    out[p + "decoder.0.conv.weight"] = (g.dec_dim, lat, 7)
    out[p + "decoder.0.conv.bias"] = (g.dec_dim,)
    ch = g.dec_dim
    for b, rate in enumerate((8, 5, 4, 3), start=1):
        q = f"{p}decoder.{b}.block."
        o = ch // 2
        out.update({
            q + "0.alpha": (ch,), q + "0.beta": (ch,),
            q + "1.conv.weight": (ch, o, 2 * rate), q + "1.conv.bias": (o,),
        })
        for u in (2, 3, 4):
            out.update({
                f"{q}{u}.act1.alpha": (o,), f"{q}{u}.act1.beta": (o,),
                f"{q}{u}.act2.alpha": (o,), f"{q}{u}.act2.beta": (o,),
                f"{q}{u}.conv1.conv.weight": (o, o, 7), f"{q}{u}.conv1.conv.bias": (o,),
                f"{q}{u}.conv2.conv.weight": (o, o, 1), f"{q}{u}.conv2.conv.bias": (o,),
            })
        ch = o
    out[p + "decoder.5.alpha"] = (ch,)
    out[p + "decoder.5.beta"] = (ch,)
    out[p + "decoder.6.conv.weight"] = (1, ch, 7)
    out[p + "decoder.6.conv.bias"] = (1,)
    return out


# --------------------------------------------------------------------------------------------
# random values


def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Values that keep activations at a sane scale through a random network.

    Matrices get std 1/sqrt(fan_in) so signals neither vanish nor explode through
    dozens of layers (with HF's 0.02 the codec output would be ~0 and every
    waveform comparison would pass trivially); norms and layer scales sit well
    away from zero so every sub-layer visibly shapes the output, which the parity
    tests rely on to catch mistakes.
    """

    def normal(std: float = 1.0, mean: float = 0.0) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std + mean).astype(np.float32)

    def uniform(lo: float, hi: float) -> np.ndarray:
        return (lo + (hi - lo) * rng.random(shape, dtype=np.float32)).astype(np.float32)

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "cluster_usage":
        return uniform(0.5, 2.0)
    if leaf in ("embedding_sum", "embed_sum"):
        return normal(0.5)
    if leaf in ("alpha", "beta"):  # SnakeBeta log-parameters
        return normal(0.1)
    if leaf == "scale":  # transformer LayerScale
        return uniform(0.3, 1.0)
    if leaf == "gamma":  # ConvNeXt layer scale
        return normal(0.05, 0.1)
    if leaf == "initialized":
        return np.ones(shape, dtype=np.float32)
    if "norm" in name and leaf == "weight":
        return normal(0.1, 1.0)
    if leaf == "bias":
        return normal(0.02)
    if "embedding" in name:  # text/codec embeddings: unit-ish rows
        return normal()
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    if name == "decoder.decoder.6.conv.weight":
        # the codec's last conv: keep the waveform mostly inside [-1, 1] so the final
        # clamp does not flatten it (a clipped waveform would hide decoder errors)
        return normal(0.3 / math.sqrt(fan_in))
    if re.search(r"decoder\.decoder\.\d\.block\.\d\.conv2\.conv\.weight$", name):
        # residual branches of the vocoder blocks: damped so 12 stacked units do not blow up
        return normal(0.3 / math.sqrt(fan_in))
    if name.endswith("codec_head.weight") or re.search(r"lm_head\.\d+\.weight$", name):
        # logits with a spread of a few nats: sampling is neither greedy-like nor uniform
        return normal(3.0 / math.sqrt(fan_in))
    return normal(1.0 / math.sqrt(fan_in))


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One numpy PCG64 stream per tensor, keyed by (seed, name): the values depend on
    neither the other tensors nor the torch version (torch's CPU RNG differs across
    releases, and checkpoints made on the GPU machine must equal those made here)."""
    out = {}
    for name, shape in sorted(shapes.items()):
        rng = np.random.default_rng([seed, _stable_hash(name)])
        out[name] = torch.from_numpy(_init(name, shape, rng)).to(dtype).contiguous()
    return out


def _stable_hash(s: str) -> int:
    h = 1469598103934665603
    for c in s.encode():
        h = ((h ^ c) * 1099511628211) % (2**64)
    return h


def mimi_encoder_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for the encoder half of a transformers MimiModel (names and shapes
    from the model itself, values from `random_weights`)."""
    from transformers import MimiConfig, MimiModel

    with torch.device("meta"):
        model = MimiModel(MimiConfig(**cfg))
    shapes = {
        "encoder." + name: tuple(t.shape)
        for name, t in model.state_dict().items()
        if not name.startswith(("upsample.", "decoder_transformer.", "decoder."))
    }
    return random_weights(shapes, seed, torch.float32)


# --------------------------------------------------------------------------------------------


# The codec-embedding row Qwen's fine-tuning recipe (`finetuning/sft_12hz.py`) gives the one
# speaker it adds, which it names in `spk_id` as a plain int (released checkpoints write lists).
FINE_TUNED_SPEAKER_ID = 3000


def make_checkpoint(variant: str, scale: str, out: str | Path, seed: int = 0, *, shards: int = 1,
                    extra_speaker: str | None = None) -> Path:
    """Write a complete random-weight checkpoint directory and return its path.

    `shards` > 1: the model weights as `model-0000i-of-0000N.safetensors` with the
    `model.safetensors.index.json` that names each tensor's shard, as large released
    checkpoints are saved. `extra_speaker`: a CustomVoice checkpoint whose `spk_id` also
    names this speaker (lower-cased, as the official code looks names up), with the id and
    form Qwen's fine-tuning recipe writes."""
    from ..model.text_tokenizer import write_text_tokenizer

    g = geometry(variant, scale)
    out = Path(out)
    (out / "speech_tokenizer").mkdir(parents=True, exist_ok=True)
    # First: it is the step that can fail for want of a package (the bundled tokenizer files),
    # and a directory left without config.json is not mistaken for a checkpoint later.
    write_text_tokenizer(out)
    cfg = model_config(variant, scale)
    if extra_speaker is not None:
        if cfg["tts_model_type"] != "custom_voice":
            raise ValueError(f"an extra speaker needs a CustomVoice variant, not {variant}")
        name = extra_speaker.strip().lower()
        if not name or name in cfg["talker_config"]["spk_id"]:
            raise ValueError(f"extra speaker name {extra_speaker!r} is empty or already a speaker")
        cfg["talker_config"]["spk_id"][name] = FINE_TUNED_SPEAKER_ID
        cfg["talker_config"]["spk_is_dialect"][name] = False

    shapes = talker_shapes(g)
    if cfg["tts_model_type"] == "base":
        shapes.update(speaker_encoder_shapes(g))
    weights = random_weights(shapes, seed, torch.bfloat16)  # bf16, as released
    save_weights(weights, out, "model", shards)
    del weights

    codec_cfg = speech_tokenizer_config(scale)
    codec = random_weights(codec_decoder_shapes(g), seed + 1, torch.float32)
    codec.update(mimi_encoder_weights(codec_cfg["encoder_config"], seed + 2))
    save_weights(codec, out / "speech_tokenizer", "model", 1)

    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", generation_config())
    _write_json(out / "preprocessor_config.json", PROCESSOR_CONFIG)
    _write_json(out / "speech_tokenizer" / "config.json", codec_cfg)
    _write_json(out / "speech_tokenizer" / "preprocessor_config.json", SPEECH_PREPROCESSOR_CONFIG)
    _write_json(out / "speech_tokenizer" / "configuration.json", {"framework": "pytorch", "task": "text-to-speech"})
    return out


def save_weights(weights: dict[str, torch.Tensor], directory: Path, stem: str, shards: int) -> None:
    """`stem.safetensors`, or `shards` files `stem-0000i-of-0000N.safetensors` of about equal
    size (tensors in name order) and `stem.safetensors.index.json`, the Hugging Face layout."""
    from safetensors.torch import save_file

    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    if shards == 1:
        save_file(weights, str(directory / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(weights)
    total = sum(weights[n].numel() * weights[n].element_size() for n in names)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for name in names:
        groups[min(shards - 1, done * shards // max(total, 1))].append(name)
        done += weights[name].numel() * weights[name].element_size()
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = f"{stem}-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in group}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    _write_json(directory / f"{stem}.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")

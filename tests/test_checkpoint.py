"""make-checkpoint: the released layout, loadable by the official implementation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from vllm_qwen3tts.tools.checkpoint import (
    VARIANTS,
    codec_decoder_shapes,
    geometry,
    model_config,
    speaker_encoder_shapes,
    talker_shapes,
)
from vllm_qwen3tts.base.config import CheckpointError, load_tts_config

RELEASED_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "speech_tokenizer/config.json",
    "speech_tokenizer/model.safetensors",
    "speech_tokenizer/preprocessor_config.json",
]


def test_cli_writes_every_released_file(tmp_path):
    out = tmp_path / "ck"
    subprocess.run(
        [sys.executable, "-m", "vllm_qwen3tts.cli", "make-checkpoint", "--variant", "0.6b-custom_voice",
         "--scale", "tiny", "--out", str(out), "--seed", "3"],
        check=True,
    )
    for name in RELEASED_FILES:
        assert (out / name).is_file(), name
    cfg = load_tts_config(out)
    assert cfg.tts_model_type == "custom_voice" and cfg.tts_model_size == "0b6"
    assert cfg.talker.spk_id["ryan"] == 3061 and cfg.talker.spk_is_dialect["eric"] == "sichuan_dialect"


def test_seed_changes_weights_and_same_seed_reproduces(tiny_checkpoint, tmp_path):
    from vllm_qwen3tts.tools.checkpoint import make_checkpoint

    a = tiny_checkpoint("0.6b-custom_voice")
    b = make_checkpoint("0.6b-custom_voice", "tiny", tmp_path / "again", seed=0)
    c = make_checkpoint("0.6b-custom_voice", "tiny", tmp_path / "other", seed=1)
    name = "talker.codec_head.weight"
    load = lambda d: safe_open(str(d / "model.safetensors"), "pt").get_tensor(name)  # noqa: E731
    assert torch.equal(load(a), load(b))
    assert not torch.equal(load(a), load(c))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_keeps_every_structural_feature(variant):
    cfg = model_config(variant, "tiny")
    t = cfg["talker_config"]
    assert t["num_key_value_heads"] < t["num_attention_heads"]  # GQA
    assert t["head_dim"] >= 64  # the vLLM CPU attention backend needs it
    # as released: the 0.6B talker's head_dim is explicit and not hidden/heads; the 1.7B's is
    assert (t["head_dim"] != t["hidden_size"] // t["num_attention_heads"]) == variant.startswith("0.6b")
    assert t["text_vocab_size"] == 151936 and t["vocab_size"] == 3072 and t["num_code_groups"] == 16
    assert t["code_predictor_config"]["vocab_size"] == 2048
    shapes = talker_shapes(geometry(variant, "tiny"))
    assert "talker.model.layers.0.self_attn.q_norm.weight" in shapes
    has_projection = "talker.code_predictor.small_to_mtp_projection.weight" in shapes
    assert has_projection == variant.startswith("1.7b")


@pytest.mark.parametrize("variant,params", [
    # 1.7B-Base's released model.safetensors is 3,857,413,744 bytes of bf16: ours is that minus a ~59 kB header.
    ("1.7b-base", 1_928_677_440),
    ("0.6b-base", 914_643_008),
])
def test_full_scale_has_released_parameter_count(variant, params):
    g = geometry(variant, "full")
    shapes = {**talker_shapes(g), **speaker_encoder_shapes(g)}
    n = sum(math.prod(s) for s in shapes.values())
    assert n == params
    assert 0 < 3_857_413_744 - 2 * sum(math.prod(s) for s in {**talker_shapes(geometry("1.7b-base", "full")), **speaker_encoder_shapes(geometry("1.7b-base", "full"))}.values()) < 100_000


def test_full_scale_config_is_the_released_geometry():
    t = model_config("0.6b-base", "full")["talker_config"]
    assert (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["head_dim"]) == (1024, 3072, 28, 128)
    t = model_config("1.7b-voice_design", "full")["talker_config"]
    assert (t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["head_dim"]) == (2048, 6144, 28, 128)
    assert t["code_predictor_config"]["num_hidden_layers"] == 5
    assert codec_decoder_shapes(geometry("0.6b-base", "full"))["decoder.pre_conv.conv.weight"] == (1024, 512, 3)


@pytest.mark.parity
@pytest.mark.parametrize("variant", VARIANTS)
def test_official_package_loads_every_weight(variant, tiny_checkpoint, official):
    """No missing, unexpected or mis-shaped tensor in either safetensors file."""
    path = tiny_checkpoint(variant)
    model = official(variant).model
    for module, file in (
        (model, path / "model.safetensors"),
        (model.speech_tokenizer.model, path / "speech_tokenizer" / "model.safetensors"),
    ):
        state = {k: v for k, v in module.state_dict().items() if not k.startswith("speech_tokenizer.")}
        with safe_open(str(file), "pt") as f:
            stored = {k: f.get_slice(k).get_shape() for k in f.keys()}
        assert set(state) == set(stored)
        for name, shape in stored.items():
            assert list(state[name].shape) == list(shape), name
        with safe_open(str(file), "pt") as f:  # values really loaded (catches silently dropped biases)
            for name in ("talker.text_projection.linear_fc1.bias", "decoder.pre_conv.conv.bias"):
                if name in stored:
                    assert torch.equal(state[name].float(), f.get_tensor(name).float()), name
    assert (model.speaker_encoder is not None) == variant.endswith("base")


def test_missing_or_foreign_checkpoint_gives_clear_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tts_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_tts_config(tmp_path)
    cfg = json.loads((tiny_checkpoint("0.6b-custom_voice") / "config.json").read_text())
    cfg["model_type"] = "qwen3"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'qwen3'"):
        load_tts_config(tmp_path)

"""The code predictor, teacher-forced on the official talker's hidden states, reproduces its codes."""

from __future__ import annotations

import pytest
import torch

from oracle import official_generate_trace
from vllm_qwen3tts.model.sampling import SamplingTensors
from vllm_qwen3tts.tools.talker_parts import load_talker_components

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module", params=["0.6b-custom_voice", "1.7b-custom_voice"])
def trace(request, tiny_checkpoint, official):
    """(variant, our components, per-step official records) from one greedy official run."""
    variant = request.param
    codes, steps = official_generate_trace(
        official(variant), "generate_custom_voice", text="The quick brown fox jumps over the lazy dog.",
        speaker="ryan", language="English", do_sample=False, subtalker_dosample=False, max_new_tokens=40,
    )
    return variant, load_talker_components(tiny_checkpoint(variant)), steps


def _inputs(comp, steps):
    hidden = torch.stack([s["past_hidden"] for s in steps])
    frames = torch.stack([s["codes"] for s in steps])
    with torch.no_grad():
        code0_embed = comp.embeddings.codec_embedding(frames[:, 0])
    return hidden, frames, code0_embed


def test_greedy_codes_identical(trace):
    _, comp, steps = trace
    hidden, frames, code0_embed = _inputs(comp, steps)
    greedy = SamplingTensors.uniform(len(steps), "cpu", temperature=0.0, top_k=50, top_p=1.0)
    with torch.no_grad():
        mine = comp.code_predictor.predict(hidden, code0_embed, comp.embeddings.residual_codec_embedding, greedy,
                                           torch.arange(len(steps)))
    assert len(set(frames[:, 1].tolist())) > 3, "degenerate test data: residual codes barely vary"
    assert torch.equal(mine, frames[:, 1:])


def test_teacher_forced_logits_close(trace, official):
    variant, comp, steps = trace
    hidden, frames, code0_embed = _inputs(comp, steps)
    with torch.no_grad():
        ref_logits, _ = official(variant).model.talker.forward_sub_talker_finetune(frames, hidden)
        mine = comp.code_predictor.teacher_forced_logits(hidden, frames, code0_embed, comp.embeddings.residual_codec_embedding)
    assert mine.shape == ref_logits.shape == (len(steps), 15, 2048)
    torch.testing.assert_close(mine, ref_logits.float(), atol=1e-4, rtol=0)
    assert torch.equal(mine.argmax(-1), ref_logits.argmax(-1))


def test_incremental_equals_teacher_forced(trace):
    """The 16-slot KV-cache loop computes exactly what one causal pass over the frame computes."""
    _, comp, steps = trace
    hidden, frames, code0_embed = _inputs(comp, steps)
    greedy = SamplingTensors.uniform(len(steps), "cpu", temperature=0.0, top_k=0, top_p=1.0)
    tables = comp.embeddings.residual_codec_embedding
    with torch.no_grad():
        codes = comp.code_predictor.predict(hidden, code0_embed, tables, greedy, torch.arange(len(steps)))
        full = torch.cat([frames[:, :1], codes], dim=1)
        tf = comp.code_predictor.teacher_forced_logits(hidden, full, code0_embed, tables)
    assert torch.equal(tf.argmax(-1), codes)


def test_batch_rows_are_independent(trace):
    """A row's sampled codes depend on its own seed and frame index only, not on its batch neighbours."""
    _, comp, steps = trace
    hidden, frames, code0_embed = _inputs(comp, steps)
    n = len(steps)
    params = SamplingTensors.uniform(n, "cpu", temperature=0.9, top_k=50, top_p=0.95)
    params.seed = torch.arange(n) * 7919 + 11
    tables = comp.embeddings.residual_codec_embedding
    with torch.no_grad():
        together = comp.code_predictor.predict(hidden, code0_embed, tables, params, torch.arange(n))
        alone = torch.cat([
            comp.code_predictor.predict(hidden[i : i + 1], code0_embed[i : i + 1], tables, params.select(torch.tensor([i])),
                                        torch.tensor([i]))
            for i in range(0, n, 7)
        ])
        reseeded = SamplingTensors(params.temperature, params.top_k, params.top_p, params.seed + 1)
        other = comp.code_predictor.predict(hidden, code0_embed, tables, reseeded, torch.arange(n))
    assert torch.equal(together[::7], alone)
    assert not torch.equal(together, other)


def test_compiled_steps_sample_what_the_eager_steps_sample(trace):
    """The GPU runs the predictor's token step and sampler through torch.compile: same codes,
    greedy and seeded (the CPU build compiles them the same way, with its own backend)."""
    _, comp, steps = trace
    hidden, _, code0_embed = _inputs(comp, steps)
    predictor = comp.code_predictor
    eager_sample = predictor.sample
    args = (hidden, code0_embed, comp.embeddings.residual_codec_embedding)
    settings = [SamplingTensors.uniform(len(steps), "cpu", temperature=0.0, top_k=50, top_p=1.0),
                SamplingTensors.uniform(len(steps), "cpu", temperature=0.9, top_k=50, top_p=0.8, seed=7)]
    with torch.no_grad():
        eager = [predictor.predict(*args, params, torch.arange(len(steps))) for params in settings]
        predictor.compile_steps()
        try:
            compiled = [predictor.predict(*args, params, torch.arange(len(steps))) for params in settings]
        finally:
            predictor.first_step, predictor.token_step = predictor._first_step, predictor._token_step
            predictor.sample = eager_sample
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)

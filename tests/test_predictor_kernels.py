"""The code predictor's Triton kernels compute what their PyTorch versions compute: the fused
token attention and the small-batch decoder layer (within rounding), and the sampler (the same
token ids).

On the CPU the Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1 must be set
before the kernel is defined, hence a child process); on a GPU, compiled. Run as a script, this
file does the comparison itself: `python tests/test_predictor_kernels.py [cpu|cuda]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

RELEASED = dict(hidden_size=1024, intermediate_size=3072, num_layers=5, num_heads=16, num_kv_heads=8, head_dim=128,
                rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=65536)


def rope_angles(g, slots: int, device: str) -> torch.Tensor:
    """[slots, head_dim] RoPE angles of each position (the predictor's cos/sin come from these)."""
    inv_freq = 1.0 / (g.rope_theta ** (torch.arange(0, g.head_dim, 2, dtype=torch.float32) / g.head_dim))
    angles = torch.arange(slots, dtype=torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat((angles, angles), dim=-1).to(device)


def largest_difference(pairs, atol: float, rtol: float, where: str) -> float:
    """max |got - expected| over (name, got, expected) pairs; raises where one exceeds atol + rtol * |expected|."""
    worst = 0.0
    for name, a, b in pairs:
        diff = (a.float() - b.float()).abs()
        if (diff - atol - rtol * b.float().abs()).max().item() > 0:
            raise AssertionError(f"{name} differs by {diff.max().item()} {where}")
        worst = max(worst, diff.max().item())
    return worst


def compare(device: str, dtype: torch.dtype, batch: int = 5) -> float:
    """Largest difference between kernel and PyTorch over every position of a frame, for the
    attention output and the written caches; raises if the two disagree beyond `dtype`'s rounding."""
    from vllm_qwen3tts.model.code_predictor import Attention
    from vllm_qwen3tts.base.config import DecoderGeometry
    from vllm_qwen3tts.model.predictor_kernels import token_attention

    torch.manual_seed(0)
    g = DecoderGeometry(**RELEASED)
    attn = Attention(g).to(device=device, dtype=dtype)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    slots = 16
    table = rope_angles(g, slots, device)
    # Entries at and after the new position hold garbage: the kernel must overwrite or mask them.
    cache_k = torch.randn(batch, g.num_kv_heads, slots, g.head_dim, device=device, dtype=dtype)
    cache_v = torch.randn_like(cache_k)
    keys = torch.arange(slots, device=device)
    # bf16: the kernel rounds once where PyTorch rounds every intermediate, so up to ~2 ulps apart
    atol, rtol = (1e-5, 0.0) if dtype == torch.float32 else (2e-2, 2**-6)
    worst = 0.0
    for p in range(slots):
        x = torch.randn(batch, 1, g.hidden_size, device=device, dtype=dtype)
        position = torch.full((1,), p, dtype=torch.long, device=device)
        cos, sin = table[position].cos().to(dtype), table[position].sin().to(dtype)
        mask = keys.unsqueeze(0) <= position.unsqueeze(-1)
        ref_k, ref_v = cache_k.clone(), cache_v.clone()
        with torch.no_grad():
            qkv = attn.qkv_proj(x)
            ref = attn.attend(qkv, cos, sin, ref_k, ref_v, position, mask).view(batch, -1)
            out = token_attention(qkv.view(batch, -1), attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, cos,
                                  sin, position, cache_k, cache_v, g.num_heads)
        worst = max(worst, largest_difference((("output", out, ref), ("cache_k", cache_k, ref_k), ("cache_v", cache_v, ref_v)),
                                              atol, rtol, f"at position {p} ({dtype})"))
    return worst


# Small enough for Triton's interpreter; the hidden and MLP widths are not powers of two (the kernel
# pads K to one) nor multiples of its column blocks, so the masked edges are exercised too.
SMALL = dict(hidden_size=320, intermediate_size=400, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64,
             rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=65536)


def reference_layer(layer, x, cos, sin, cache_k, cache_v, position, mask):
    """`DecoderLayer.forward`'s PyTorch path, spelled out (on a GPU `forward` itself would take the
    fused one)."""
    attn = layer.self_attn
    out = attn.attend(attn.qkv_proj(layer.input_layernorm(x)), cos, sin, cache_k, cache_v, position, mask)
    x = x + attn.o_proj(out)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def compare_layer(device: str, dtype: torch.dtype, geometry: dict, batches=(1, 3), positions=(0, 9, 15)) -> float:
    """Largest difference between `DecoderLayer.token_forward` (the small-batch kernels) and the
    PyTorch layer, outputs and written caches, for one and for two new tokens per row, and between `small_linear` and a plain projection
    (an output head); raises beyond `dtype`'s rounding."""
    from vllm_qwen3tts.model.code_predictor import DecoderLayer
    from vllm_qwen3tts.base.config import DecoderGeometry
    from vllm_qwen3tts.model.predictor_kernels import small_linear

    torch.manual_seed(0)
    g = DecoderGeometry(**geometry)
    layer = DecoderLayer(g).to(device=device, dtype=dtype)
    head = torch.nn.Linear(g.hidden_size, 2048, bias=False).to(device=device, dtype=dtype)
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.uniform_(0.5, 1.5)
    slots = 16
    table = rope_angles(g, slots, device)
    keys = torch.arange(slots, device=device)
    atol, rtol = (2e-5, 2e-5) if dtype == torch.float32 else (5e-2, 2**-5)
    worst = 0.0
    for batch in batches:
        cache_k = torch.randn(batch, g.num_kv_heads, slots, g.head_dim, device=device, dtype=dtype)
        cache_v = torch.randn_like(cache_k)
        # one new token per row, and two (the predictor's first step: positions p and p + 1 at once)
        for p, n in [(p, 1) for p in positions] + [(0, 2), (positions[-1] - 1, 2)]:
            x = torch.randn(batch, n, g.hidden_size, device=device, dtype=dtype) * 3
            new_positions = torch.arange(p, p + n, dtype=torch.long, device=device)
            cos, sin = table[new_positions].cos().to(dtype), table[new_positions].sin().to(dtype)
            mask = keys.unsqueeze(0) <= new_positions.unsqueeze(-1)
            ref_k, ref_v = cache_k.clone(), cache_v.clone()
            with torch.no_grad():
                ref = reference_layer(layer, x, cos, sin, ref_k, ref_v, new_positions, mask)
                out = layer.token_forward(x, cos, sin, cache_k, cache_v, new_positions)
                logits, ref_logits = small_linear(out.flatten(0, 1), head.weight), head(out.flatten(0, 1))
            pairs = (("layer output", out, ref), ("cache_k", cache_k, ref_k), ("cache_v", cache_v, ref_v),
                     ("head logits", logits, ref_logits))
            worst = max(worst, largest_difference(pairs, atol, rtol, f"(batch {batch}, {n} at position {p}, {dtype})"))
    return worst


SAMPLER_CASES = [  # (temperature, top_k, top_p) per row group; <= 0 temperature is greedy
    (0.0, 50, 1.0), (0.9, 50, 1.0), (1.3, 0, 1.0), (0.7, 2048, 1.0), (1.0, 1, 1.0), (0.9, 50, 0.8),
    (1.0, 0, 0.3), (0.6, 7, 0.95), (0.0, 0, 0.5),
]


def sample_keeping_ties_at_the_cut(logits, params, counter) -> torch.Tensor:
    """`sampling.sample`, except that values tied with the smallest one top-p keeps are kept too
    (the reference cuts among them by sort order; the kernel keeps them, as top-k does)."""
    from vllm_qwen3tts.model.sampling import SamplingTensors, process_logits, uniform_noise

    top_k_only = process_logits(logits, SamplingTensors(params.temperature, params.top_k,
                                                        torch.ones_like(params.top_p), params.seed))
    processed = process_logits(logits, params)
    cut = processed.masked_fill(processed == float("-inf"), float("inf")).amin(dim=-1, keepdim=True)
    kept = top_k_only.masked_fill(top_k_only < cut, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(params.seed, counter, logits.shape[-1])))
    return torch.where((params.temperature > 0).unsqueeze(-1), kept + gumbel, kept).argmax(dim=-1)


def compare_sampler(device: str, rows_per_case: int = 8, draws: int = 2) -> int:
    """Token ids of `fused_sample` and of the PyTorch sampler over every case of SAMPLER_CASES, for
    bf16 logits (what the predictor's heads give: many tied values) and fp32 ones; raises on any
    difference. Returns how many draws were compared."""
    from vllm_qwen3tts.model.predictor_kernels import fused_sample
    from vllm_qwen3tts.model.sampling import SamplingTensors

    gen = torch.Generator().manual_seed(0)
    n = rows_per_case * len(SAMPLER_CASES)
    col = lambda values, dt: torch.tensor(values, dtype=dt).repeat_interleave(rows_per_case).to(device)  # noqa: E731
    params = SamplingTensors(col([c[0] for c in SAMPLER_CASES], torch.float32), col([c[1] for c in SAMPLER_CASES], torch.long),
                             col([c[2] for c in SAMPLER_CASES], torch.float32),
                             torch.randint(0, 2**62, (n,), generator=gen).to(device))
    compared = 0
    for dtype in (torch.bfloat16, torch.float32):
        for draw in range(draws):
            # peaked and flat rows alike: scale varies per row
            scale = torch.rand(n, 1, generator=gen) * 6 + 0.5
            logits = (torch.randn(n, 2048, generator=gen) * scale).to(dtype).to(device)
            counter = torch.randint(0, 2**40, (n,), generator=gen).to(device)
            expected = sample_keeping_ties_at_the_cut(logits, params, counter)
            got = fused_sample(logits, params.temperature, params.top_k, params.top_p, params.seed, counter)
            bad = (got != expected).nonzero().flatten().tolist()
            if bad:
                raise AssertionError(f"{len(bad)} of {n} draws differ ({dtype}, draw {draw}); first rows {bad[:5]}, "
                                     f"cases {[SAMPLER_CASES[i // rows_per_case] for i in bad[:5]]}")
            compared += n
    # -0.0 and +0.0 are one value: top-k 1 keeps both, so both indices get drawn
    for dtype in (torch.bfloat16, torch.float32):
        logits = torch.full((n, 2048), -20.0, dtype=dtype)
        logits[:, 0], logits[:, 1] = 0.0, -0.0
        logits = logits.to(device)
        zeros = SamplingTensors(torch.ones(n, device=device), torch.ones(n, dtype=torch.long, device=device),
                                torch.ones(n, device=device), params.seed)
        counter = torch.arange(n, device=device)
        expected = sample_keeping_ties_at_the_cut(logits, zeros, counter)
        got = fused_sample(logits, zeros.temperature, zeros.top_k, zeros.top_p, zeros.seed, counter)
        assert set(expected.tolist()) == {0, 1}, "the reference should draw both signed zeros"
        if not torch.equal(got, expected):
            raise AssertionError(f"signed zeros ({dtype}): drew {got.tolist()[:8]}, expected {expected.tolist()[:8]}")
        compared += n
    check_top_noise_bucket(device)
    return compared


def check_top_noise_bucket(device: str) -> None:
    """The noise's top bucket (test_sampling.py's TOP_BUCKET) forces no draw in the kernel either:
    greedy and top-k 1 rows draw the best token, as the PyTorch sampler does."""
    from test_sampling import TOP_BUCKET, top_bucket_rows
    from vllm_qwen3tts.model.predictor_kernels import fused_sample

    for dtype in (torch.bfloat16, torch.float32):
        logits, p, counter = top_bucket_rows(device, dtype)
        got = fused_sample(logits, p.temperature, p.top_k, p.top_p, p.seed, counter)
        if got.tolist() != [3, 3]:
            raise AssertionError(f"the top noise bucket (column {TOP_BUCKET[2]}) drew {got.tolist()} ({dtype}), not [3, 3]")


def in_interpreter(what: str) -> subprocess.CompletedProcess:
    """This file run as a script under Triton's interpreter, comparing `what`."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, __file__, "cpu", what], env=env, capture_output=True, text=True, timeout=600)


# The comparison each interpreter test runs in its child process, the longest first.
INTERPRETER_RUNS = {
    "test_small_batch_layer_matches_pytorch_layer_in_triton_interpreter": "layer",
    "test_kernel_matches_pytorch_attention_in_triton_interpreter": "attention",
    "test_fused_sampler_draws_the_tokens_of_the_pytorch_sampler_in_triton_interpreter": "sampler",
    "test_layer_comparison_notices_a_missing_residual": "broken-layer",
}


@pytest.fixture(scope="module")
def run_in_interpreter(request):
    """`run_in_interpreter(what)` -> the stdout of `in_interpreter(what)`, which must exit 0. The
    children of every selected interpreter test run two at a time from the first such test on
    (each is one single-threaded interpreter: with two cores, the longest runs while the others
    do); each test then waits for its own."""
    pytest.importorskip("triton", reason="Triton is not installed with this build of torch")
    selected = {item.name for item in request.session.items if item.module is request.module}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {what: pool.submit(in_interpreter, what) for name, what in INTERPRETER_RUNS.items() if name in selected}

        def result(what: str) -> str:
            done = (runs.get(what) or runs.setdefault(what, pool.submit(in_interpreter, what))).result()
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        yield result


def test_kernel_matches_pytorch_attention_in_triton_interpreter(run_in_interpreter):
    assert "float32 max diff" in run_in_interpreter("attention")


def test_small_batch_layer_matches_pytorch_layer_in_triton_interpreter(run_in_interpreter):
    assert "layer float32 max diff" in run_in_interpreter("layer")


def test_layer_comparison_notices_a_missing_residual(run_in_interpreter):
    """The comparison itself can fail: a down projection that drops the residual is caught."""
    assert "a dropped residual is caught" in run_in_interpreter("broken-layer")


def compare_broken_layer() -> str:
    import vllm_qwen3tts.model.code_predictor as predictor

    real = predictor.small_linear

    def without_mlp_residual(x, weight, **kw):
        if kw.get("silu_mul"):
            kw.pop("residual", None)
        return real(x, weight, **kw)

    predictor.small_linear = without_mlp_residual
    try:
        compare_layer("cpu", torch.float32, SMALL, batches=(2,), positions=(3,))
    except AssertionError as e:
        assert "layer output differs" in str(e), e
        return "a dropped residual is caught"
    finally:
        predictor.small_linear = real
    raise AssertionError("the comparison passed a layer without its MLP residual")


def test_fused_sampler_draws_the_tokens_of_the_pytorch_sampler_in_triton_interpreter(run_in_interpreter):
    assert "sampler: 432 draws identical" in run_in_interpreter("sampler")


def test_sampler_comparison_notices_a_different_draw():
    """The comparison itself can fail: a sampler that ignores top-k differs from the reference."""
    from vllm_qwen3tts.model import sampling

    def no_top_k(logits, temperature, top_k, top_p, seed, counter):
        return sampling.sample(logits, sampling.SamplingTensors(temperature, torch.zeros_like(top_k), top_p, seed), counter)

    import vllm_qwen3tts.model.predictor_kernels as kernels

    real = kernels.fused_sample
    kernels.fused_sample = no_top_k
    try:
        with pytest.raises(AssertionError, match="draws differ"):
            compare_sampler("cpu", rows_per_case=4, draws=1)
    finally:
        kernels.fused_sample = real


@pytest.mark.gpu
def test_kernel_matches_pytorch_attention_on_gpu():
    compare("cuda", torch.float32)
    compare("cuda", torch.bfloat16, batch=64)


@pytest.mark.gpu
def test_small_batch_layer_matches_pytorch_on_gpu():
    compare_layer("cuda", torch.float32, RELEASED, batches=(1, 16))
    compare_layer("cuda", torch.bfloat16, RELEASED, batches=(1, 7, 16))


@pytest.mark.gpu
def test_fused_sampler_matches_pytorch_on_gpu():
    compare_sampler("cuda", rows_per_case=64, draws=4)


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    what = sys.argv[2] if len(sys.argv) > 2 else "all"
    if what in ("attention", "all"):
        dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
        for dt in dtypes:
            print(f"{device} {str(dt).removeprefix('torch.')} max diff {compare(device, dt):.3g}")
    if what in ("layer", "all"):
        runs = [(torch.float32, SMALL)] if device == "cpu" else [(torch.float32, RELEASED), (torch.bfloat16, RELEASED)]
        for dt, geometry in runs:
            print(f"{device} layer {str(dt).removeprefix('torch.')} max diff {compare_layer(device, dt, geometry):.3g}")
    if what == "broken-layer":
        print(compare_broken_layer())
    if what in ("sampler", "all"):
        print(f"{device} sampler: {compare_sampler(device)} draws identical")

"""Seeded per-row sampling: the processed distribution is Hugging Face's, and draws follow it."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vllm_qwen3tts.model.sampling import SamplingTensors, process_logits, sample, uniform_noise


def hf_processed(logits, temperature, top_k, top_p):
    x = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return x


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.9, 50, 1.0), (1.3, 5, 1.0), (0.7, 0, 0.8), (1.0, 20, 0.5), (0.5, 2048, 0.99)])
def test_processed_probabilities_match_hf(temperature, top_k, top_p):
    logits = torch.randn(6, 2048, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :4] = 5.0  # ties at the top
    params = SamplingTensors.uniform(6, "cpu", temperature, top_k, top_p)
    mine = process_logits(logits, params).softmax(-1)
    ref = hf_processed(logits, temperature, top_k, top_p).softmax(-1)
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=0)


def test_rows_use_their_own_parameters():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    params = SamplingTensors(
        temperature=torch.tensor([0.5, 1.0, 2.0]), top_k=torch.tensor([3, 0, 10]),
        top_p=torch.tensor([1.0, 0.7, 1.0]), seed=torch.zeros(3, dtype=torch.long),
    )
    mine = process_logits(logits, params).softmax(-1)
    for i, (t, k, p) in enumerate([(0.5, 3, 1.0), (1.0, 0, 0.7), (2.0, 10, 1.0)]):
        torch.testing.assert_close(mine[i], hf_processed(logits[i : i + 1], t, k, p).softmax(-1)[0], atol=1e-6, rtol=0)


def test_draws_follow_the_processed_distribution():
    """Chi-square goodness of fit over 20k draws from a 6-way distribution (counter = draw index)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    params = SamplingTensors.uniform(n, "cpu", temperature=1.0, top_k=0, top_p=1.0, seed=1234)
    draws = sample(logits.expand(n, -1), params, torch.arange(n))
    observed = torch.bincount(draws, minlength=6).float()
    expected = logits.softmax(-1)[0] * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # p = 0.001 at 5 degrees of freedom


def test_greedy_rows_take_the_argmax_and_masked_ids_are_never_drawn():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(3))
    greedy = SamplingTensors.uniform(64, "cpu", temperature=0.0, top_k=50, top_p=1.0)
    assert torch.equal(sample(logits, greedy, torch.arange(64)), logits.argmax(-1))
    top3 = SamplingTensors.uniform(64, "cpu", temperature=5.0, top_k=3, top_p=1.0, seed=9)
    draws = sample(logits, top3, torch.arange(64))
    allowed = logits.topk(3, dim=-1).indices
    assert (draws.unsqueeze(-1) == allowed).any(-1).all()


# (seed, counter, column) whose hash is the largest 24-bit value (found by search): the centre of
# that bucket rounds to 1.0 in float32, whose Gumbel noise is inf
TOP_BUCKET = (1141, 17, 1757)


def top_bucket_rows(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(logits, params, counter) of two rows drawn at TOP_BUCKET: one greedy, one sampled with top-k
    1; the best token is 3, the bucket's column is another."""
    seed, counter, _ = TOP_BUCKET
    logits = torch.zeros(2, 2048, dtype=dtype, device=device)
    logits[:, 3] = 1.0
    params = SamplingTensors(torch.tensor([0.0, 1.0], device=device), torch.tensor([0, 1], device=device),
                             torch.ones(2, device=device), torch.full((2,), seed, device=device))
    return logits, params, torch.full((2,), counter, device=device)


def test_the_top_noise_bucket_forces_no_draw():
    """At the top bucket the noise is held just below 1. It once was 1.0: a greedy row then read
    0 * inf = NaN there and drew that column (greedy codes of one request differed between runs
    whose random seeds differed), and a sampled row drew it whatever top-k had cut."""
    seed, counter, column = TOP_BUCKET
    u = uniform_noise(torch.tensor([seed]), torch.tensor([counter]), 2048)[0]
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    assert u[column] == below_one and (u < 1).all()
    assert sample(*top_bucket_rows()).tolist() == [3, 3]


def test_noise_is_a_pure_function_of_seed_counter_and_column():
    seeds = torch.tensor([1, 2, 2**40 + 5, -7])
    counters = torch.tensor([0, 0, 3, 9])
    a = uniform_noise(seeds, counters, 512)
    b = uniform_noise(seeds.flip(0), counters.flip(0), 512).flip(0)
    assert torch.equal(a, b)
    assert (a > 0).all() and (a < 1).all()
    assert not torch.equal(a[0], a[1])
    assert abs(a.mean().item() - 0.5) < 0.02
    assert not torch.equal(uniform_noise(seeds, counters + 1, 512), a)

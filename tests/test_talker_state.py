"""The per-request talker state, independent of vLLM's runners, and the Model Runner V2 glue.

Model Runner V2 cannot run on the CPU build, so its glue (token slots from a batch,
the sampler wrapper) is driven here with real TalkerState / code predictor / embeddings
and batch objects shaped like MRv2's InputBatch; the GPU run checks the rest end to end.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from vllm_qwen3tts.model.prompt import SpeechRequest, build_prompt
from vllm_qwen3tts.talker.protocol import CODE_ID_STRIDE, SubtalkerParams, TalkerRequest
from vllm_qwen3tts.talker.state import TalkerState
from vllm_qwen3tts.model.text_tokenizer import load_text_tokenizer
from vllm_qwen3tts.tools.talker_parts import load_talker_components

SLOTS = 4


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    path = tiny_checkpoint("1.7b-custom_voice")
    return load_talker_components(path), load_text_tokenizer(path)


def request(parts, text: str, speaker: str = "ryan", **kw) -> TalkerRequest:
    comp, tok = parts
    recipe = build_prompt(comp.config, tok, SpeechRequest(text=text, speaker=speaker, non_streaming_mode=False, **kw))
    return TalkerRequest(recipe, SubtalkerParams(temperature=0.0), seed=3)


def new_state(parts) -> TalkerState:
    comp, _ = parts
    return TalkerState(comp.config.talker, max_slots=SLOTS, max_positions=256, max_frames=256, max_ref_frames=16,
                       device="cpu", dtype=torch.float32)


def embed(state, parts, slot, positions):
    comp, _ = parts
    with torch.no_grad():
        return state.embed(comp.embeddings, torch.full((len(positions),), slot), torch.tensor(positions))


def complete(state, parts, slots, last_positions, code0, sampled=None, hidden=None):
    comp, _ = parts
    n = len(slots)
    if hidden is None:
        hidden = torch.randn(n, comp.config.talker.decoder.hidden_size, generator=torch.Generator().manual_seed(n))
    sampled = torch.ones(n, dtype=torch.bool) if sampled is None else torch.tensor(sampled)
    with torch.no_grad():
        return state.after_sample(comp.embeddings, comp.code_predictor, torch.tensor(slots),
                                  torch.tensor(last_positions), torch.tensor(code0), hidden, sampled)


def test_prompt_embeddings_equal_the_recipe_in_any_chunking(parts):
    comp, _ = parts
    state = new_state(parts)
    req = request(parts, "Chunked prefill must not change anything.")
    L = len(req.recipe)
    state.add_request(2, "r", req.to_extra_args(), L, L)
    with torch.no_grad():
        whole = comp.embeddings.prefill(req.recipe)
    # equal up to float32 rounding: the text projection's matrix products see other batch shapes
    torch.testing.assert_close(embed(state, parts, 2, list(range(L))), whole, atol=1e-6, rtol=0)
    chunks = [embed(state, parts, 2, list(range(a, min(a + 7, L)))) for a in range(0, L, 7)]
    torch.testing.assert_close(torch.cat(chunks), whole, atol=1e-6, rtol=0)


def test_a_sampled_frame_becomes_the_next_decode_input(parts):
    comp, _ = parts
    state = new_state(parts)
    req = request(parts, "Decode inputs follow the text track.")
    L = len(req.recipe)
    state.add_request(0, "r", req.to_extra_args(), L, L)
    codes = complete(state, parts, [0], [L - 1], [123])
    assert codes.shape == (1, 16) and codes[0, 0] == 123
    frame = codes
    for k in range(3):  # frame k is the input at position L + k, with text addend k
        with torch.no_grad():
            want = comp.embeddings.decode_input(frame, torch.tensor([req.recipe.text_addend_id(k)]))
        assert torch.equal(embed(state, parts, 0, [L + k]), want)
        frame = complete(state, parts, [0], [L + k], [7 + k])


def test_partial_prefill_and_eos_rows_record_no_frame(parts):
    state = new_state(parts)
    req = request(parts, "Only complete samples count.")
    L = len(req.recipe)
    state.add_request(1, "r", req.to_extra_args(), L, L)
    before = state.history[1].clone()
    complete(state, parts, [1], [L - 5], [11])  # a chunk that ends inside the prompt
    complete(state, parts, [1], [L - 1], [state.cfg.codec_eos_id])  # EOS is not a frame
    complete(state, parts, [1], [L - 1], [12], sampled=[False])  # vLLM discards this row
    assert torch.equal(state.history[1], before)


def test_rows_of_a_batch_complete_independently(parts):
    state = new_state(parts)
    reqs = [request(parts, "First request."), request(parts, "The second one, longer.", speaker="vivian")]
    for slot, req in enumerate(reqs):
        state.add_request(slot, f"r{slot}", req.to_extra_args(), len(req.recipe), len(req.recipe))
    last = [len(r.recipe) - 1 for r in reqs]
    hidden = torch.randn(2, parts[0].config.talker.decoder.hidden_size, generator=torch.Generator().manual_seed(0))
    together = complete(state, parts, [0, 1], last, [5, 9], hidden=hidden)
    alone = [complete(new_state_with(parts, reqs[i], i), parts, [i], [last[i]], [c], hidden=hidden[i : i + 1])
             for i, c in enumerate([5, 9])]
    assert torch.equal(together[0], alone[0][0]) and torch.equal(together[1], alone[1][0])


def new_state_with(parts, req, slot):
    state = new_state(parts)
    state.add_request(slot, "x", req.to_extra_args(), len(req.recipe), len(req.recipe))
    return state


def test_preempted_request_resumes_with_its_frames(parts):
    """MRv2 removes a preempted request and re-adds it (maybe in another slot) with its
    generated tokens appended to the prompt; the re-prefill needs their residual codes."""
    state = new_state(parts)
    req = request(parts, "Preemption keeps every frame.")
    L = len(req.recipe)
    state.add_request(0, "r", req.to_extra_args(), L, L)
    frames = [complete(state, parts, [0], [L - 1 + k], [20 + k]) for k in range(3)]
    decode_inputs = embed(state, parts, 0, [L, L + 1, L + 2])
    state.remove_request("r")
    state.remove_request("r")  # MRv2 also calls remove before every add: harmless
    state.add_request(3, "r", req.to_extra_args(), L, L + 3)
    assert not state.poisoned[3]
    assert torch.equal(embed(state, parts, 3, [L, L + 1, L + 2]), decode_inputs)
    assert torch.equal(state.history[3, :3].long(), torch.cat(frames))
    state.add_request(2, "unknown", req.to_extra_args(), L, L + 2)  # no parked history
    assert state.poisoned[2]


@pytest.mark.parametrize("mutate", [
    lambda args: None,
    lambda args: args.pop("qwen3_tts"),
    lambda args: args["qwen3_tts"]["recipe"].update(v=99),
    lambda args: args["qwen3_tts"]["recipe"]["text_ids"].__setitem__(0, 10**9),
    lambda args: args["qwen3_tts"]["recipe"]["codec_ids"].__setitem__(3, 5000),
    lambda args: args["qwen3_tts"].update(subtalker=[0.5, -3, 1.0]),
])
def test_bad_conditioning_poisons_the_request_instead_of_raising(parts, mutate):
    state = new_state(parts)
    req = request(parts, "Conditioning from a client we do not control.")
    args = copy.deepcopy(req.to_extra_args())
    if mutate(args) is None and args == req.to_extra_args():
        args = {"qwen3_tts": {"recipe": {"v": 1, "text_ids": [], "codec_ids": [], "ref_frames": []}}}
    state.add_request(1, "bad", args, len(req.recipe), len(req.recipe))
    assert state.poisoned[1]
    assert not state.poisoned[0]
    state.add_request(1, "good", req.to_extra_args(), len(req.recipe), len(req.recipe))
    assert not state.poisoned[1]
    wrong_length = req.to_extra_args()
    state.add_request(0, "short", wrong_length, len(req.recipe) - 1, len(req.recipe) - 1)
    assert state.poisoned[0]


def test_vllm_warmup_requests_are_poisoned_quietly_and_real_ones_loudly(parts, caplog):
    import logging

    state = new_state(parts)
    with caplog.at_level(logging.DEBUG, logger="vllm_qwen3tts.talker.state"):
        state.add_request(0, "_warmup_0_", None, 4, 4)  # Model Runner V2's kernel warm-up
        state.add_request(1, "cmpl-123", None, 4, 4)  # a client of vLLM's generic routes
    assert state.poisoned[0] and state.poisoned[1]
    levels = {r.getMessage().split()[1]: r.levelno for r in caplog.records}
    assert levels == {"_warmup_0_": logging.DEBUG, "cmpl-123": logging.ERROR}


# ---------------------------------------------------------------------------------- MRv2 glue


def mrv2_state(parts, talker):
    from vllm_qwen3tts.talker.model_state_v2 import Qwen3TTSModelState

    ms = object.__new__(Qwen3TTSModelState)  # no VllmConfig on the CPU; only what the hooks use
    ms.talker = talker
    ms.rope_state = None
    ms.prompt_embeds_state = None
    ms.supports_mm_inputs = False
    ms.token_slots = torch.full((64,), talker.state.null_slot, dtype=torch.int64)
    return ms


def talker_of(parts, state):
    comp, _ = parts
    t = SimpleNamespace(state=state, row_slots=None, sample_hidden=None)

    def complete_frames(slots, last_positions, code0, sampled):
        return state.after_sample(comp.embeddings, comp.code_predictor, slots, last_positions, code0,
                                  t.sample_hidden, sampled)

    t.complete_frames = complete_frames
    return t


def test_model_state_v2_gives_every_token_its_slot_and_pads_with_the_null_slot(parts):
    state = new_state(parts)
    talker = talker_of(parts, state)
    ms = mrv2_state(parts, talker)
    batch = SimpleNamespace(num_reqs=3, num_tokens=8, num_tokens_after_padding=12,
                            idx_mapping=torch.tensor([2, 0, 3, 1], dtype=torch.int32),
                            query_start_loc=torch.tensor([0, 5, 6, 8, 8], dtype=torch.int32))
    inputs = ms.prepare_inputs(batch, None)
    null = state.null_slot
    assert inputs["token_slots"].tolist() == [2, 2, 2, 2, 2, 0, 3, 3, null, null, null, null]
    assert inputs["token_slots"].data_ptr() == ms.token_slots.data_ptr()  # the captured buffer
    assert talker.row_slots.tolist() == [2, 0, 3]
    dummy = ms.prepare_dummy_inputs(2, 6)
    assert dummy["token_slots"].tolist() == [null] * 6


def test_sampler_wrapper_emits_all_codes_with_codebook_offsets(parts):
    from vllm.v1.worker.gpu.sample.output import SamplerOutput

    from vllm_qwen3tts.talker.model_state_v2 import TalkerSampler

    comp, _ = parts
    state = new_state(parts)
    talker = talker_of(parts, state)
    req = request(parts, "The wrapper completes frames.")
    L = len(req.recipe)
    state.add_request(1, "req-a", req.to_extra_args(), L, L)

    class BaseSampler:  # vLLM's sampler, reduced to its output for one sampled row
        calls = 0

        def __call__(self, logits, input_batch):
            self.calls += 1
            return SamplerOutput(sampled_token_ids=torch.tensor([[42]]), logprobs_tensors=None, num_nans=None,
                                 num_sampled=torch.ones(1, dtype=torch.int32),
                                 num_rejected=torch.zeros(1, dtype=torch.int32))

        def add_request(self, req_idx, *args):
            self.added = (req_idx, *args)

        def apply_staged_writes(self):
            return "delegated"

    base = BaseSampler()
    wrapper = TalkerSampler(base, talker)
    talker.sample_hidden = torch.randn(1, comp.config.talker.decoder.hidden_size)
    batch = SimpleNamespace(num_reqs=1, req_ids=["req-a"], idx_mapping=torch.tensor([1], dtype=torch.int32),
                            positions=torch.arange(64), logits_indices=torch.tensor([L - 1]))
    out = wrapper(torch.zeros(1, 3072), batch)
    ids = out.logprobs_tensors.logprob_token_ids[0]
    codes = ids - torch.arange(16) * CODE_ID_STRIDE
    assert codes[0] == 42 and ((codes >= 0) & (codes < 2048)).all()
    assert torch.equal(state.history[1, 0].long(), codes)
    assert wrapper.apply_staged_writes() == "delegated"  # everything else goes to vLLM's sampler
    # vLLM's sampler samples code 0 but is not asked for logprobs: the channel carries our codes
    from vllm_qwen3tts.talker.protocol import Code0Params, talker_sampling_params

    sp = talker_sampling_params(req, Code0Params(), 50, 2150)
    wrapper.add_request(1, L, sp)  # vLLM 0.26 passes the prompt length, 0.32 does not
    idx, plen, given = base.added
    assert (idx, plen, given.logprobs, given.max_tokens, given.extra_args) == (1, L, None, 50, sp.extra_args)
    wrapper.add_request(2, sp)
    idx, given = base.added
    assert (idx, given.logprobs, given.max_tokens) == (2, None, 50)
    assert sp.logprobs == 16 - 1  # the engine's copy still asks for the channel
    dummy = SimpleNamespace(num_reqs=1, req_ids=["req_0_dummy"], idx_mapping=torch.tensor([1], dtype=torch.int32),
                            positions=torch.arange(64), logits_indices=torch.tensor([L - 1]))
    before = state.history[1].clone()
    wrapper(torch.zeros(1, 3072), dummy)  # vLLM's profiling batch: touches the null slot only
    assert torch.equal(state.history[1], before)


def test_an_incremental_request_keeps_eos_back_itself_so_a_turn_may_stop_at_any_frame(parts):
    """A turn of an incremental request must be able to stop on HOLD at its first frame, so it has
    no vLLM min_tokens (vLLM 0.26 would not stop on any stop id before it); the talker holds EOS
    back itself until the request's min_frames, before vLLM samples. An ordinary request's minimum
    stays vLLM's."""
    import dataclasses

    from vllm.v1.worker.gpu.sample.output import SamplerOutput

    from vllm_qwen3tts.talker.model_state_v2 import TalkerSampler
    from vllm_qwen3tts.talker.protocol import Code0Params, hold_token_id, talker_sampling_params

    comp, _ = parts
    cfg = comp.config.talker
    eos = cfg.codec_eos_id
    state = new_state(parts)
    talker = talker_of(parts, state)
    incremental = dataclasses.replace(request(parts, "Speak as it comes."), incremental=True, min_frames=3)
    ordinary = request(parts, "Spoken at once.")
    L, Lo = len(incremental.recipe), len(ordinary.recipe)
    state.add_request(1, "inc", incremental.to_extra_args(), L, L)
    state.add_request(2, "ord", ordinary.to_extra_args(), Lo, Lo)

    class Argmax:  # vLLM's sampler, reduced to greedy sampling
        def __call__(self, logits, input_batch):
            ids = logits.argmax(-1, keepdim=True)
            return SamplerOutput(sampled_token_ids=ids, logprobs_tensors=None, num_nans=None,
                                 num_sampled=torch.ones(len(ids), dtype=torch.int32),
                                 num_rejected=torch.zeros(len(ids), dtype=torch.int32))

    wrapper = TalkerSampler(Argmax(), talker)
    for frame in range(5):
        logits = torch.zeros(2, cfg.vocab_size)
        logits[:, eos] = 10.0  # EOS would win every time
        talker.sample_hidden = torch.randn(2, cfg.decoder.hidden_size)
        batch = SimpleNamespace(num_reqs=2, req_ids=["inc", "ord"], idx_mapping=torch.tensor([1, 2], dtype=torch.int32),
                                positions=torch.arange(512), logits_indices=torch.tensor([L - 1 + frame, Lo - 1 + frame]))
        sampled = wrapper(logits, batch).sampled_token_ids[:, 0].tolist()
        assert (sampled[0] == eos) == (frame >= 3), f"frame {frame}: {sampled}"
        assert sampled[1] == eos  # the ordinary request's minimum is vLLM's min_tokens, not the talker's

    hold = hold_token_id(cfg)
    turn = talker_sampling_params(incremental, Code0Params(), 50, eos, min_frames=3, hold_id=hold)
    assert turn.min_tokens == 0 and set(turn.stop_token_ids) == {eos, hold}
    assert talker_sampling_params(ordinary, Code0Params(), 50, eos, min_frames=3).min_tokens == 3
    state.remove_request("inc")
    assert not state.early_eos_slots  # ordinary steps skip the mask again

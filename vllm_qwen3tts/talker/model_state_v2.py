"""Model Runner V2 (production path): the talker's `ModelState` and sampler wrapper.

MRv2 lets a model supply its own per-request state class. Ours forwards request
arrival/departure to `TalkerState`, gives the forward a per-token slot tensor
(a persistent buffer, so FULL CUDA graphs replay with the right addresses), and
wraps the sampler so the code predictor runs right after code 0 is sampled, and hands vLLM the
HOLD token for an incremental request whose text has not arrived (as the V1 runner does).

Overridden: add_request, remove_request, prepare_inputs, prepare_dummy_inputs,
custom_sampler — their signatures are the same from vLLM 0.26 to 0.32. We
subclass DefaultModelState, never ModelState, so the abstract embedding hook
(renamed between those versions) is always implemented.
"""

from __future__ import annotations

from typing import Any

import torch

from ..base.vllm_adapter import DefaultModelState, split_sampler_add_request_args
from .protocol import codes_as_logprobs, hold_token_id


class Qwen3TTSModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.talker = model
        null = model.state.null_slot
        self.token_slots = torch.full((self.max_num_tokens,), null, dtype=torch.int64, device=device)

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        sp = new_req_data.sampling_params
        prefill = new_req_data.prefill_token_ids or new_req_data.prompt_token_ids
        self.talker.state.add_request(
            req_index,
            new_req_data.req_id,
            sp.extra_args if sp is not None else None,
            len(new_req_data.prompt_token_ids),
            len(prefill),
        )

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self.talker.state.remove_request(req_id)

    def prepare_inputs(self, input_batch, req_states) -> dict[str, Any]:
        inputs = super().prepare_inputs(input_batch, req_states)
        n = input_batch.num_tokens
        n_pad = input_batch.num_tokens_after_padding
        num_reqs = input_batch.num_reqs
        idx = input_batch.idx_mapping[:num_reqs].long()
        counts = input_batch.query_start_loc[1 : num_reqs + 1] - input_batch.query_start_loc[:num_reqs]
        # on the device, with the output size known on the host: no synchronisation
        self.token_slots[:n] = torch.repeat_interleave(idx, counts.long(), output_size=n)
        self.token_slots[n:n_pad] = self.talker.state.null_slot
        self.talker.row_slots = idx
        inputs["token_slots"] = self.token_slots[:n_pad]
        return inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)
        self.token_slots[:num_tokens] = self.talker.state.null_slot
        self.talker.row_slots = None
        inputs["token_slots"] = self.token_slots[:num_tokens]
        return inputs

    def custom_sampler(self, sampler):
        return TalkerSampler(sampler, self.talker), None


class TalkerSampler:
    """Lets vLLM sample code 0 (penalties, min_tokens, seeds...), then completes the frames."""

    def __init__(self, base, talker):
        self.base = base
        self.talker = talker

    def __getattr__(self, name):
        return getattr(self.base, name)

    def add_request(self, req_idx: int, *args) -> None:
        # The codes leave through the logprobs channel, but they are ours: the base sampler is
        # told not to compute logprobs, which saves a logits copy, a log-softmax and a top-k
        # over the vocabulary per step (the engine still ships our tensors, it does not ask).
        rest, sampling_params = split_sampler_add_request_args(args)
        sp = sampling_params.clone()
        sp.logprobs = None
        self.base.add_request(req_idx, *rest, sp)

    def __call__(self, logits: torch.Tensor, input_batch):
        state = self.talker.state
        num_reqs = input_batch.num_reqs
        real = bool(input_batch.req_ids) and input_batch.req_ids[0] in state.slot_of
        last_positions = input_batch.positions[input_batch.logits_indices][:num_reqs]
        if real:
            state.mask_early_eos(logits, input_batch.idx_mapping[:num_reqs], last_positions)
        out = self.base(logits, input_batch)
        code0 = out.sampled_token_ids[:, 0]
        if real:
            slots = input_batch.idx_mapping[:num_reqs]
        else:  # profiling / warm-up batch: exercise the predictor on the null slot
            slots = torch.full_like(code0, state.null_slot)
        sampled = torch.ones_like(code0, dtype=torch.bool)
        codes = self.talker.complete_frames(slots, last_positions, code0, sampled)
        out.logprobs_tensors = codes_as_logprobs(codes, out.logprobs_tensors)
        if state.any_open_input:
            # an incremental request whose next step lacks its text token: vLLM sees HOLD (a stop id)
            # and pauses the session; the frame's codes went out above. On the device, no sync.
            hold = state.hold_mask(slots, last_positions, code0)
            out.sampled_token_ids[:, 0] = torch.where(hold, hold_token_id(state.cfg), code0)
        return out

"""Model Runner V1 support (the vLLM CPU build; a GPU fallback), in one guarded module.

V1 gives a model no per-request hook, so this driver reads the runner that is
building the model (found on the call stack while the model is constructed)
and, on each forward, turns its persistent batch into token slots for
`TalkerState`. It keeps its own slot per request id because V1 moves requests
between batch rows. The runner's sampler is wrapped (one attribute) so the code
predictor runs right after code 0 is sampled.

Everything read here is read-only runner state: `input_batch.req_ids`,
`input_batch.num_computed_tokens_cpu`, `query_start_loc.np`, `requests[...]`
(`prompt_token_ids`, `output_token_ids`, `sampling_params`; a new `sampling_params` object
on a known request is a streaming-input session's next turn), `discard_request_mask.np`. A vLLM
change to any of them fails loudly at start-up. Two things are written: the generators of
discarded rows are swapped for stand-ins on the CPU (see `_RewindByState`), and the sampled token
of a row that must hold becomes the HOLD id (`TalkerState.hold_mask`).
"""

from __future__ import annotations

import inspect
import weakref

import numpy as np
import torch

from .protocol import codes_as_logprobs, hold_token_id

REQUIRED_RUNNER_ATTRS = ("input_batch", "query_start_loc", "requests", "sampler", "discard_request_mask")


class UnsupportedRunner(RuntimeError):
    pass


def _find_runner():
    from ..base.vllm_adapter import GPUModelRunner

    for frame_info in inspect.stack(context=0):
        candidate = frame_info.frame.f_locals.get("self")
        if isinstance(candidate, GPUModelRunner):
            return candidate
    raise UnsupportedRunner(
        "Qwen3-TTS needs either Model Runner V2 or vLLM's V1 GPUModelRunner family; no runner was "
        "found while the model was built. Set VLLM_USE_V2_MODEL_RUNNER=1 on GPUs."
    )


def attach_v1_driver(model, vllm_config) -> "V1Driver":
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        raise UnsupportedRunner(
            "Qwen3-TTS on Model Runner V1 builds its inputs in Python inside forward, which FULL CUDA "
            "graphs would freeze. Use Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1) or "
            "--compilation-config '{\"cudagraph_mode\": \"PIECEWISE\"}'."
        )
    runner = _find_runner()
    missing = [a for a in REQUIRED_RUNNER_ATTRS if not hasattr(runner, a)]
    if missing:
        raise UnsupportedRunner(f"this vLLM's V1 model runner lacks {missing}; unsupported vLLM version")
    driver = V1Driver(model, runner)
    runner.sampler = V1TalkerSampler(runner.sampler, driver)
    return driver


class V1Driver:
    def __init__(self, model, runner):
        self._model = weakref.ref(model)
        self._runner = weakref.ref(runner)
        self.free_slots = list(range(model.state.max_slots - 1, -1, -1))
        self.row_slots: torch.Tensor | None = None
        self.last_positions: torch.Tensor | None = None
        self._params_seen: dict[str, object] = {}  # the SamplingParams each request's slot was loaded from

    @property
    def state(self):
        return self._model().state

    def _sync_requests(self, req_ids: list[str]) -> None:
        runner = self._runner()
        state = self.state
        for req_id in [r for r in state.slot_of if r not in runner.requests]:
            self.free_slots.append(state.slot_of[req_id])
            state.remove_request(req_id)
            self._params_seen.pop(req_id, None)
        for req_id in req_ids:
            if req_id in state.slot_of:
                cached = runner.requests[req_id]
                if cached.sampling_params is not self._params_seen.get(req_id):
                    # a streaming-input session's next turn: V1 kept the request, with new params
                    self._params_seen[req_id] = cached.sampling_params
                    state.update_text(req_id, cached.sampling_params.extra_args)
                continue
            if not self.free_slots:
                raise RuntimeError("no free talker slot; max_num_seqs is exceeded")
            cached = runner.requests[req_id]
            prompt_len = len(cached.prompt_token_ids)
            sp = cached.sampling_params
            state.add_request(self.free_slots.pop(), req_id, sp.extra_args if sp else None, prompt_len, prompt_len)
            self._params_seen[req_id] = sp

    def token_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of every token of this step's batch (null slot for padding and dummy runs)."""
        runner = self._runner()
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        model = self._model()
        null = self.state.null_slot
        n = positions.shape[0]
        qsl = runner.query_start_loc.np[: num_reqs + 1]
        if num_reqs == 0 or int(qsl[-1]) > n or any(r not in runner.requests for r in batch.req_ids[:num_reqs]):
            # a profiling / warm-up run: no real requests behind these tokens
            model.row_slots = None
            return torch.full_like(positions, null)
        req_ids = list(batch.req_ids[:num_reqs])
        self._sync_requests(req_ids)
        rows = np.array([self.state.slot_of[r] for r in req_ids], dtype=np.int64)
        num_scheduled = np.diff(qsl)
        slots = np.full(n, null, dtype=np.int64)
        slots[: int(qsl[-1])] = np.repeat(rows, num_scheduled)
        last = batch.num_computed_tokens_cpu[:num_reqs] + num_scheduled - 1
        device = positions.device
        self.row_slots = torch.from_numpy(rows).to(device)
        self.last_positions = torch.from_numpy(last.astype(np.int64)).to(device)
        model.row_slots = self.row_slots
        return torch.from_numpy(slots).to(device)


class V1TalkerSampler:
    """Wraps V1's sampler: after code 0 is sampled, complete the frames and emit 16 codes."""

    def __init__(self, base, driver: V1Driver):
        self.base = base
        self.driver = driver

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __call__(self, logits: torch.Tensor, sampling_metadata, *args, **kwargs):
        generators = getattr(sampling_metadata, "generators", None) or {}
        before = restore_rewound_generators(generators)
        driver = self.driver
        model = driver._model()
        rows = driver.row_slots
        real = rows is not None and rows.shape[0] == logits.shape[0]
        if real:
            model.state.mask_early_eos(logits, rows, driver.last_positions)
        out = self.base(logits, sampling_metadata, *args, **kwargs)
        code0 = out.sampled_token_ids[:, 0]
        if not real:
            return out  # profiling run
        runner = driver._runner()
        discard_np = runner.discard_request_mask.np[: rows.shape[0]].copy()
        rewind_by_state(generators, before, np.nonzero(discard_np)[0])
        discard = torch.from_numpy(discard_np).to(code0.device)
        codes = model.complete_frames(rows, driver.last_positions, code0, ~discard)
        out.logprobs_tensors = codes_as_logprobs(codes, out.logprobs_tensors)
        hold = model.state.hold_mask(rows, driver.last_positions, code0) & ~discard
        if bool(hold.any()):
            # vLLM sees HOLD (a stop id) and pauses the session; the frame's codes went out above
            out.sampled_token_ids[:, 0] = torch.where(hold, hold_token_id(model.state.cfg), code0)
        return out


# A request whose prefill is split over steps samples a token at each partial step that V1
# discards; V1 then rewinds the request's generator by `set_offset(get_offset() - 4)`, which only
# CUDA (Philox) generators have: a seeded request split on the CPU build killed the engine
# ("CPU Generator does not use offset"). For CPU generators the sampler wrapper keeps each one's
# state from before the draw and, for the discarded rows, leaves a stand-in in the batch's
# generator dict (the same dict the sampling metadata holds) whose set_offset restores that
# state; the next draw puts the real generators back first. Nothing else reads the dict between.

class _RewindByState:
    def __init__(self, generator: torch.Generator, state: torch.Tensor):
        self.generator = generator
        self.state = state

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> None:
        self.generator.set_state(self.state)


def restore_rewound_generators(generators: dict) -> dict[int, torch.Tensor]:
    """Put real generators back in place of stand-ins; the state of every CPU generator before
    this step's draw, by batch row."""
    for row, g in list(generators.items()):
        if isinstance(g, _RewindByState):
            generators[row] = g.generator
    return {row: g.get_state() for row, g in generators.items() if g.device.type == "cpu"}


def rewind_by_state(generators: dict, before: dict[int, torch.Tensor], discarded_rows) -> None:
    for row in discarded_rows:
        row = int(row)
        if row in before and row in generators:
            generators[row] = _RewindByState(generators[row], before[row])

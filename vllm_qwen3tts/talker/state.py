"""Per-request talker state on the device, independent of which vLLM model runner drives it.

Every request occupies a *slot* (a row in fixed-size buffers). The input
embedding of any token is a pure function of (slot, position):

- position p < L (the prompt): the recipe entry at p — projected text token plus
  a codec entry (codec id, the speaker x-vector, or a reference frame);
- position L + k (decode step k): S(frame k) + P(trailing text k, or PAD).

Because the generated frames are kept (the `history` buffer), this one rule
covers prefill, chunked prefill, decode, and re-prefill after preemption, and
it is plain tensor code: batched over tokens, no host synchronisation, and
capturable inside the talker's CUDA graph.

After vLLM samples code 0 of a frame, `after_sample` runs the code predictor
for every sampled row at once, stores the 16 codes in `history`, and returns
them for the output channel.

An incremental request (its text still arriving, `input_closed` False) may reach a frame whose
next step needs a text token it does not have yet: `hold_mask` names those rows, the runner hands
vLLM the HOLD id for them (`protocol.hold_token_id`) so their turn ends, and `update_text` loads
the grown text when the next turn comes.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict

import torch

from ..model.code_predictor import CodePredictor
from ..base.config import TalkerConfig
from ..base.params import PromptError
from ..model.prompt import NO_CODEC, NO_REF, NO_TEXT, SPEAKER_VECTOR
from ..model.sampling import SamplingTensors
from ..model.talker_io import TalkerEmbeddings
from .protocol import TalkerRequest

logger = logging.getLogger(__name__)


class TalkerState:
    def __init__(
        self,
        cfg: TalkerConfig,
        max_slots: int,
        max_positions: int,
        max_frames: int,
        max_ref_frames: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        self.cfg = cfg
        self.max_slots = max_slots
        self.null_slot = max_slots  # padding tokens and dummy runs read (and write) this row
        self.max_positions = max_positions
        self.max_frames = max_frames
        self.max_ref_frames = max_ref_frames
        self.device = torch.device(device)
        n = max_slots + 1
        q = cfg.num_code_groups

        def ints(*shape, fill=0, dt=torch.int32):
            return torch.full(shape, fill, dtype=dt, device=self.device)

        self.prompt_len = ints(n)
        self.prefill_len = ints(n)
        self.prompt_text = ints(n, max_positions, fill=NO_TEXT)
        self.prompt_codec = ints(n, max_positions, fill=NO_CODEC)
        self.prompt_ref = ints(n, max_positions, fill=NO_REF)
        self.trailing_text = ints(n, max_positions)
        self.trailing_len = ints(n)
        self.pad_text = ints(n)
        self.input_closed = torch.ones(n, dtype=torch.bool, device=self.device)
        self.min_frames = ints(n)  # EOS held back before this frame (incremental requests; 0: vLLM does it)
        self.xvector = torch.zeros(n, cfg.decoder.hidden_size, dtype=dtype, device=self.device)
        self.ref_codes = ints(n, max(max_ref_frames, 1), q)
        self.history = ints(n, max_frames, q, dt=torch.int16)
        self.poisoned = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.sub_temperature = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.sub_top_k = ints(n, dt=torch.int64)
        self.sub_top_p = torch.ones(n, dtype=torch.float32, device=self.device)
        self.seed = ints(n, dt=torch.int64)

        self.slot_of: dict[str, int] = {}
        self.open_input_slots: set[int] = set()  # slots of requests whose input is not closed
        self.early_eos_slots: set[int] = set()  # slots whose EOS the talker holds back (min_frames > 0)
        # Histories of removed requests, kept because removal may be a preemption:
        # the request then comes back as "new" with its generated tokens appended
        # to the prompt, and re-prefilling them needs their residual codes.
        self.parked: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_parked = 2 * max_slots

    # ------------------------------------------------------------------ requests

    def add_request(self, slot: int, req_id: str, extra_args: dict | None, prompt_len: int, prefill_len: int) -> None:
        """Load a request into `slot`. Never raises on bad input: the request is
        poisoned instead (it emits EOS as soon as vLLM allows), so one malformed
        request cannot take the engine down."""
        self.slot_of[req_id] = slot
        # Scalars go in with fill_ (a kernel argument): `buf[slot] = value` copies a CPU scalar
        # tensor from pageable memory, which waits for the step running on the GPU.
        self.prompt_len[slot].fill_(prompt_len)
        self.prefill_len[slot].fill_(prefill_len)
        try:
            req = TalkerRequest.from_extra_args(extra_args)
            if req.incremental and prompt_len > len(req.recipe):
                # A later turn re-added by Model Runner V2 (or a preempted incremental request): vLLM's
                # prompt has the earlier turns' frames in it; the talker's is the recipe's.
                prompt_len = len(req.recipe)
                self.prompt_len[slot].fill_(prompt_len)
            self._load(slot, req_id, req, prompt_len, prefill_len)
            self.poisoned[slot].fill_(False)
        except PromptError as e:
            # vLLM's own dummy requests (ids starting with "_", e.g. Model Runner V2's kernel
            # warm-up of max_num_seqs "_warmup_i_" requests at every start) carry no conditioning
            # by design; only a real request's rejection is an error worth a log line.
            level = logging.DEBUG if req_id.startswith("_") else logging.ERROR
            logger.log(level, "request %s rejected in the worker (it will end at once): %s", req_id, e)
            self.poisoned[slot].fill_(True)

    def _load(self, slot: int, req_id: str, req: TalkerRequest, prompt_len: int, prefill_len: int) -> None:
        self._validate(req, prompt_len)
        r = req.recipe
        refs = r.ref_codes or []

        def put(buf: torch.Tensor, values: list, fill: int) -> None:
            buf[slot].fill_(fill)
            if values:
                buf[slot, : len(values)] = self._upload(values, buf.dtype)

        put(self.prompt_text, r.text_ids, NO_TEXT)
        put(self.prompt_codec, r.codec_ids, NO_CODEC)
        put(self.prompt_ref, r.ref_frames, NO_REF)
        self._set_text(slot, req)
        self.pad_text[slot].fill_(r.pad_text_id)
        if r.xvector is not None:
            self.xvector[slot] = self._upload(r.xvector, self.xvector.dtype)
        if refs:
            self.ref_codes[slot, : len(refs)] = self._upload(refs, torch.int32)
        sub = req.subtalker
        self.sub_temperature[slot].fill_(sub.temperature)
        self.sub_top_k[slot].fill_(sub.top_k)
        self.sub_top_p[slot].fill_(sub.top_p)
        self.seed[slot].fill_(req.seed if req.seed is not None else random.getrandbits(62))
        self.min_frames[slot].fill_(req.min_frames)
        if req.min_frames > 0:
            self.early_eos_slots.add(slot)
        else:
            self.early_eos_slots.discard(slot)

        generated = prefill_len - prompt_len
        if generated > 0:
            # Resumed after preemption: the re-prefill covers generated frames too.
            parked = self.parked.pop(req_id, None)
            if parked is None:
                raise PromptError(f"resumed with {generated} generated frames but their codes were not kept")
            self.history[slot] = parked
            # each later turn of an incremental request comes this way on Model Runner V2: not news
            logger.log(logging.DEBUG if req.incremental else logging.INFO,
                       "request %s resumed: re-prefilling %d generated frames", req_id, generated)

    def _upload(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list as a device tensor without waiting for the GPU. A copy from pageable
        memory returns only once the stream has run everything queued before it, so new
        requests made vLLM's CPU work (scheduling the next step) wait for the running step."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _validate(self, req: TalkerRequest, prompt_len: int) -> None:
        """Everything the buffers and embedding tables assume, checked before any write."""
        r, cfg = req.recipe, self.cfg
        n = len(r)
        if n != prompt_len:
            raise PromptError(f"prompt has {prompt_len} placeholder tokens but the recipe has {n} positions")
        if n > self.max_positions or len(r.trailing_text_ids) > self.max_positions:
            raise PromptError(f"prompt of {n} positions exceeds the talker's limit of {self.max_positions}")
        refs = r.ref_codes or []
        if len(refs) > self.max_ref_frames:
            raise PromptError(f"reference of {len(refs)} frames exceeds the limit of {self.max_ref_frames}")
        if any(len(f) != cfg.num_code_groups or min(f) < 0 or max(f) >= cfg.code_predictor.vocab_size for f in refs):
            raise PromptError("reference codes out of range")
        if r.xvector is not None and len(r.xvector) != cfg.decoder.hidden_size:
            raise PromptError("x-vector size does not match the talker")
        text_ok = all(0 <= t < cfg.text_vocab_size for t in r.text_ids + r.trailing_text_ids + [r.pad_text_id] if t != NO_TEXT)
        codec_ok = all(0 <= c < cfg.vocab_size for c in r.codec_ids if c not in (NO_CODEC, SPEAKER_VECTOR))
        if not (text_ok and codec_ok):
            raise PromptError("prompt ids out of range")
        if SPEAKER_VECTOR in r.codec_ids and r.xvector is None:
            raise PromptError("prompt uses a speaker vector but carries none")
        if any(f >= len(refs) for f in r.ref_frames if f != NO_REF):
            raise PromptError("prompt refers to a reference frame it does not carry")
        req.subtalker.validate()

    def update_text(self, req_id: str, extra_args: dict | None) -> None:
        """An incremental request's next turn: its trailing text has grown (and may be closed).
        The prompt part of the recipe is the one loaded at first; only the text track changes."""
        slot = self.slot_of[req_id]
        try:
            req = TalkerRequest.from_extra_args(extra_args)
            self._validate(req, len(req.recipe))
        except PromptError as e:
            logger.error("request %s: text update rejected (it will end at once): %s", req_id, e)
            self.poisoned[slot].fill_(True)
            return
        self._set_text(slot, req)

    def _set_text(self, slot: int, req: TalkerRequest) -> None:
        trailing = req.recipe.trailing_text_ids
        self.trailing_text[slot].fill_(0)
        if trailing:
            self.trailing_text[slot, : len(trailing)] = self._upload(trailing, self.trailing_text.dtype)
        self.trailing_len[slot].fill_(len(trailing))
        self.input_closed[slot].fill_(req.input_closed)
        if req.input_closed:
            self.open_input_slots.discard(slot)
        else:
            self.open_input_slots.add(slot)

    def hold_mask(self, slots: torch.Tensor, last_positions: torch.Tensor, code0: torch.Tensor) -> torch.Tensor:
        """Rows whose frame just sampled leaves the next step without its text token: the input
        is not closed and the trailing text ends at that frame (an EOS ends the request instead)."""
        slots = slots.long()
        frame = self._frame_sampled(slots, last_positions)
        return (~self.input_closed[slots]) & (frame >= self.trailing_len[slots].long()) & (code0 != self.cfg.codec_eos_id)

    def mask_early_eos(self, logits: torch.Tensor, slots: torch.Tensor, last_positions: torch.Tensor) -> None:
        """Before sampling: EOS out of reach for rows whose next frame comes before their request's
        `min_frames` (vLLM's min_tokens does this for other requests). In place; only while some
        loaded request asks for it (`early_eos_slots`, a host-side check)."""
        if not self.early_eos_slots:
            return
        slots = slots.long()
        early = self._frame_sampled(slots, last_positions) < self.min_frames[slots].long()
        logits[:, self.cfg.codec_eos_id].masked_fill_(early, float("-inf"))

    def _frame_sampled(self, slots: torch.Tensor, last_positions: torch.Tensor) -> torch.Tensor:
        """The frame index that the logits at `last_positions` (of requests in `slots`, long) sample."""
        return last_positions.long() + 1 - self.prompt_len[slots].long()

    @property
    def any_open_input(self) -> bool:
        """Whether a loaded request may still get text (so may have to hold): a host-side check
        that spares every other step the hold mask's kernels."""
        return bool(self.open_input_slots)

    def remove_request(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, None)
        if slot is None:
            return
        self.open_input_slots.discard(slot)
        self.early_eos_slots.discard(slot)
        self.parked[req_id] = self.history[slot].clone()
        while len(self.parked) > self.max_parked:
            self.parked.popitem(last=False)

    # ------------------------------------------------------------------ per step

    def embed(self, emb: TalkerEmbeddings, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Input embeddings [N, H] of tokens at `positions` of the requests in `slots`."""
        slots = slots.long()
        positions = positions.long()
        L = self.prompt_len[slots].long()
        step = positions - L
        in_prompt = step < 0
        p = positions.clamp(0, self.max_positions - 1)
        k = step.clamp(0, self.max_frames - 1)

        trailing = self.trailing_text[slots, k.clamp(max=self.max_positions - 1)]
        trailing = torch.where(k < self.trailing_len[slots], trailing, self.pad_text[slots])
        text_id = torch.where(in_prompt, self.prompt_text[slots, p], trailing).long()
        codec_id = torch.where(in_prompt, self.prompt_codec[slots, p], NO_CODEC).long()
        ref = torch.where(in_prompt, self.prompt_ref[slots, p], NO_REF).long()

        frame_codes = torch.where(
            in_prompt.unsqueeze(-1),
            self.ref_codes[slots, ref.clamp(min=0)],
            self.history[slots, k].to(torch.int32),
        ).long()
        use_frame = ~in_prompt | (ref != NO_REF)

        zero = torch.zeros((), dtype=self.xvector.dtype, device=self.device)
        text = torch.where((text_id != NO_TEXT).unsqueeze(-1), emb.text(text_id.clamp(min=0)), zero)
        codec = torch.where((codec_id >= 0).unsqueeze(-1), emb.codec_embedding(codec_id.clamp(min=0)), zero)
        codec = codec + torch.where((codec_id == SPEAKER_VECTOR).unsqueeze(-1), self.xvector[slots], zero)
        codec = codec + torch.where(use_frame.unsqueeze(-1), emb.frame(frame_codes), zero)
        # one rounding: text + codec, as the reference adds its two tracks
        return text + codec

    def after_sample(
        self,
        emb: TalkerEmbeddings,
        predictor: CodePredictor,
        slots: torch.Tensor,  # [B] slot of each sampled row
        last_positions: torch.Tensor,  # [B] position of the token whose logits were sampled
        code0: torch.Tensor,  # [B] sampled codebook-0 ids
        hidden: torch.Tensor,  # [B, H] final-normed talker hidden state of that token
        sampled: torch.Tensor,  # [B] bool: the row produced a real sample (not a partial prefill)
    ) -> torch.Tensor:
        """Complete each sampled frame with codes 1..15, record it, and return [B, 16]."""
        slots = slots.long()
        code0 = code0.long()
        frame = self._frame_sampled(slots, last_positions)
        valid = (
            sampled
            & (last_positions.long() + 1 >= self.prefill_len[slots].long())
            & (code0 >= 0)
            & (code0 < self.cfg.num_audio_codes)
            & (frame >= 0)
            & (frame < self.max_frames)
            & (slots != self.null_slot)
        )
        params = SamplingTensors(
            temperature=self.sub_temperature[slots],
            top_k=self.sub_top_k[slots],
            top_p=self.sub_top_p[slots],
            seed=self.seed[slots],
        )
        safe_code0 = code0.clamp(0, self.cfg.vocab_size - 1)
        residual = predictor.predict(
            hidden, emb.codec_embedding(safe_code0), emb.residual_codec_embedding, params, frame.clamp(min=0)
        )
        codes = torch.cat([code0.unsqueeze(-1), residual], dim=-1)
        write_slot = torch.where(valid, slots, self.null_slot)
        write_frame = torch.where(valid, frame, 0)
        self.history[write_slot, write_frame] = codes.to(torch.int16)
        return codes

    def poison_mask(self, slots: torch.Tensor) -> torch.Tensor:
        return self.poisoned[slots.long()]

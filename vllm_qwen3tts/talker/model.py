"""The Qwen3-TTS talker as a vLLM model.

The decoder is vLLM's own `Qwen3Model` (paged attention, the platform's
attention backend, torch.compile and CUDA graphs); around it sit the talker's
input embeddings, codec head and code predictor (plain PyTorch, replicated per
rank). vLLM samples code 0 of each frame; the sampler wrapper then runs the
code predictor for the whole batch and hands all 16 codes back through the
sample-logprobs channel (`logprobs=15, flat_logprobs=True`).

Per-request state lives in `TalkerState`; a runner-specific adapter feeds it:
`model_state_v2.Qwen3TTSModelState` on Model Runner V2 (production), or
`runner_v1.V1Driver` on Model Runner V1 (the CPU build).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from ..base.vllm_adapter import Qwen3Model, VllmConfig, check_vllm_version, uses_model_runner_v2
from ..model.code_predictor import CodePredictor
from ..base.config import parse_tts_config
from ..model.talker_io import CodecHead, TalkerEmbeddings
from .frame_graphs import FrameCompleter
from .projections import small_batch_projections_enabled, use_small_batch_projections
from .state import TalkerState

logger = logging.getLogger(__name__)

# Upper bounds of the per-slot buffers. The API layer rejects longer requests.
MAX_PROMPT_POSITIONS = 4096
MAX_REFERENCE_FRAMES = 750  # 60 s of reference audio at 12.5 frames/s


class Qwen3TTSTalkerForVLLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        check_vllm_version()
        hf = vllm_config.model_config.hf_config
        self.tts_config = parse_tts_config(hf.to_dict())
        talker = self.tts_config.talker
        self.model = Qwen3Model(vllm_config=vllm_config, prefix=f"{prefix}model" if prefix else "model")
        if small_batch_projections_enabled():
            use_small_batch_projections(self.model)
        self.embeddings = TalkerEmbeddings(talker)
        self.head = CodecHead(talker)
        self.code_predictor = CodePredictor(talker)

        max_model_len = vllm_config.model_config.max_model_len
        self.state = TalkerState(
            talker,
            max_slots=vllm_config.scheduler_config.max_num_seqs,
            max_positions=min(max_model_len, MAX_PROMPT_POSITIONS),
            max_frames=max_model_len,
            max_ref_frames=MAX_REFERENCE_FRAMES,
            device=vllm_config.device_config.device,
            dtype=vllm_config.model_config.dtype,
        )
        # Poisoned requests (bad conditioning) may only end: code 0 as a fallback
        # while vLLM's min_tokens still masks EOS, EOS afterwards.
        poison = torch.full((talker.vocab_size,), float("-inf"))
        poison[talker.codec_eos_id] = 0.0
        poison[0] = -1e4
        self.register_buffer("poison_logits", poison, persistent=False)

        # Piecewise CUDA graphs of the decoder replay with the addresses they were captured
        # with, so its input must live in one persistent buffer (FULL graphs capture the
        # embedding computation itself, writing to this same buffer).
        self.inputs_embeds = torch.zeros(
            vllm_config.scheduler_config.max_num_batched_tokens, talker.decoder.hidden_size,
            dtype=vllm_config.model_config.dtype, device=vllm_config.device_config.device,
        )
        self.frame_completer = FrameCompleter(
            self.state, self.embeddings, self.code_predictor, talker.decoder.hidden_size,
            max_batch=vllm_config.scheduler_config.max_num_seqs, dtype=vllm_config.model_config.dtype,
            use_graphs=not vllm_config.model_config.enforce_eager,
        )
        self.row_slots: torch.Tensor | None = None  # slot of each logits row of the current step
        self.sample_hidden: torch.Tensor | None = None  # hidden states handed to compute_logits
        self.v1_driver = None
        runner_v2 = uses_model_runner_v2(vllm_config)
        if not runner_v2:
            from .runner_v1 import attach_v1_driver

            self.v1_driver = attach_v1_driver(self, vllm_config)
        predictor = talker.code_predictor
        logger.info("Qwen3-TTS talker: %d layers of %d, code predictor %d layers of %d, %d slots; Model Runner %s; "
                    "frame completion %s", talker.decoder.num_layers, talker.decoder.hidden_size,
                    predictor.decoder.num_layers, predictor.decoder.hidden_size,
                    vllm_config.scheduler_config.max_num_seqs, "V2" if runner_v2 else "V1",
                    "in CUDA graphs" if self.frame_completer.use_graphs else "eager")

    # Model Runner V2 asks the model for its per-request state class.
    def get_model_state_cls(self):
        from .model_state_v2 import Qwen3TTSModelState

        return Qwen3TTSModelState

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings.codec_embedding(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        token_slots: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            if token_slots is None:
                token_slots = self.v1_driver.token_slots(positions) if self.v1_driver else self._null_slots(positions)
            n = positions.shape[0]
            self.inputs_embeds[:n] = self.state.embed(self.embeddings, token_slots, positions)
            inputs_embeds = self.inputs_embeds[:n]
        return self.model(None, positions, intermediate_tensors, inputs_embeds)

    def _null_slots(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.full_like(positions, self.state.null_slot)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.sample_hidden = hidden_states
        logits = self.head(hidden_states)
        rows = self.row_slots
        if rows is not None and rows.shape[0] == logits.shape[0]:
            logits = torch.where(self.state.poison_mask(rows).unsqueeze(-1), self.poison_logits, logits)
        return logits

    def complete_frames(
        self, slots: torch.Tensor, last_positions: torch.Tensor, code0: torch.Tensor, sampled: torch.Tensor
    ) -> torch.Tensor:
        """Codes 1..15 for every sampled row, recorded in the state; returns [B, 16]."""
        hidden = self.sample_hidden
        if hidden is None or hidden.shape[0] != code0.shape[0]:
            raise RuntimeError("sampler called without matching compute_logits hidden states")
        return self.frame_completer(slots, last_positions, code0, hidden, sampled)

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Released checkpoint names -> this module.

        talker.model.{layers,norm}.*      -> model.* (vLLM's Qwen3Model fuses q/k/v and gate/up)
        talker.model.codec_embedding      -> model.embed_tokens and embeddings.codec_embedding
        talker.model.text_embedding, talker.text_projection.*,
        talker.code_predictor.model.codec_embedding.* -> embeddings.*
        talker.codec_head                 -> head
        talker.code_predictor.*           -> code_predictor.*
        speaker_encoder.*                 -> not here (the codec worker owns it)
        """
        decoder_weights = []
        other = []
        for name, tensor in weights:
            if name.startswith(("talker.model.layers.", "talker.model.norm.")):
                decoder_weights.append((name[len("talker.model."):], tensor))
            elif name == "talker.model.codec_embedding.weight":
                decoder_weights.append(("embed_tokens.weight", tensor))
                other.append((name, tensor))
            elif name.startswith("talker."):
                other.append((name, tensor))
            elif not name.startswith("speaker_encoder."):
                raise ValueError(f"unexpected tensor {name!r} in a Qwen3-TTS checkpoint")
        loaded = {f"model.{n}" for n in self.model.load_weights(decoder_weights)}
        for prefix, module in (("embeddings", self.embeddings), ("head", self.head), ("code_predictor", self.code_predictor)):
            module.load_weights(other)  # raises on a missing tensor
            loaded |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
        return loaded

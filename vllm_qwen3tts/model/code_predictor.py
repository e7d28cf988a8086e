"""The code predictor: residual codebooks 1..15 of a frame from the talker's hidden state.

A small Qwen3-style decoder (5 layers released) run autoregressively over 16
positions per frame: position 0 is the talker's final-normed hidden state,
position 1 the embedding of code 0, position j the embedding of code j-1.
Positions 0 and 1 go in one pass (both are known once code 0 is drawn), then
one token per step: 14 steps after the first for the 15 codes.
Each frame starts from an empty 16-slot KV cache, so there is no re-prefill
and the shapes are fixed (graph capturable). Batched over requests; each row
samples with its own temperature / top-k / top-p / seed.

Numerics follow the reference exactly where it is known to matter (errors
compound through the 15 sub-steps): RMSNorm in fp32 then cast, then weight;
RoPE cos/sin computed in fp32 and cast to the activation dtype.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..base.config import DecoderGeometry, TalkerConfig
from .layers import GatedMLP, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from .predictor_kernels import fused_sample, kernels_enabled, small_linear, token_attention, use_kernel, use_small_linear
from .sampling import SamplingTensors, sample
from ..base.weight_loading import load_mapped, stacked_name_map, stacked_shard_rows


class Attention(nn.Module):
    def __init__(self, g: DecoderGeometry):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = g.num_heads, g.num_kv_heads, g.head_dim
        # q, k and v in one GEMM (the checkpoint's three matrices stacked by `load_weights`)
        self.qkv_proj = nn.Linear(g.hidden_size, (g.num_heads + 2 * g.num_kv_heads) * g.head_dim, bias=False)
        self.o_proj = nn.Linear(g.num_heads * g.head_dim, g.hidden_size, bias=False)
        self.q_norm = RMSNorm(g.head_dim, g.rms_norm_eps)
        self.k_norm = RMSNorm(g.head_dim, g.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [B, n, hidden]
        cos: torch.Tensor,  # [n, head_dim]
        sin: torch.Tensor,
        cache_k: torch.Tensor,  # [B, kv_heads, S, head_dim], zeros where nothing was written yet
        cache_v: torch.Tensor,
        positions: torch.Tensor,  # [n] int64: where the new tokens sit (and are written)
        mask: torch.Tensor,  # [n, S] bool: which cache entries each new token sees
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.kernel_fits(qkv, cache_k):
            out = self.attend_tokens(qkv, cos, sin, cache_k, cache_v, positions)
        else:
            out = self.attend(qkv, cos, sin, cache_k, cache_v, positions, mask)
        return self.o_proj(out)

    def kernel_fits(self, x: torch.Tensor, cache_k: torch.Tensor) -> bool:
        """Whether this attention runs as the Triton kernel for activations like x and this cache."""
        return use_kernel(x, self.head_dim, cache_k.shape[2], self.heads // self.kv_heads)

    def attend_tokens(self, qkv, cos, sin, cache_k, cache_v, positions) -> torch.Tensor:
        """`attend` as the Triton kernel (`predictor_kernels.token_attention`), one launch per new
        token in order, so each sees the cache entries of the ones before it; [B, n, H * D]."""
        outs = [token_attention(qkv[:, i], self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos[i], sin[i],
                                positions[i : i + 1], cache_k, cache_v, self.heads) for i in range(qkv.shape[1])]
        return outs[0].unsqueeze(1) if len(outs) == 1 else torch.stack(outs, dim=1)

    def attend(self, qkv, cos, sin, cache_k, cache_v, positions, mask) -> torch.Tensor:
        """The attention in PyTorch, from the new tokens' projections qkv [B, n, (H + 2 KV) * D] to
        [B, n, H * D] (no output projection); their k and v go into the caches. The reference the
        Triton kernel (`predictor_kernels.token_attention`) is checked against."""
        b, n, _ = qkv.shape
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = self.q_norm(q.reshape(b, n, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.reshape(b, n, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.reshape(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        cache_k.index_copy_(2, positions, k)
        cache_v.index_copy_(2, positions, v)
        # Always the whole (16-entry) cache, masked: shapes never depend on the position. The
        # query heads sharing a KV head are stacked as extra query rows ([B, kv, group * n, D]),
        # so the cache is read once per KV head and never expanded to every query head (that
        # copy was most of the predictor's attention time at large batches).
        group = self.heads // self.kv_heads
        q = q.reshape(b, self.kv_heads, group * n, self.head_dim)
        scores = torch.matmul(q, cache_k.transpose(-1, -2)) * self.head_dim**-0.5  # [B, kv, group * n, S]
        scores = scores.masked_fill(~mask.repeat(group, 1), float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        out = torch.matmul(probs, cache_v).view(b, self.heads, n, self.head_dim)
        return out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)


class DecoderLayer(nn.Module):
    def __init__(self, g: DecoderGeometry):
        super().__init__()
        self.input_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.self_attn = Attention(g)
        self.post_attention_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.mlp = GatedMLP(g.hidden_size, g.intermediate_size)

    def forward(self, x, cos, sin, cache_k, cache_v, positions, mask) -> torch.Tensor:
        attn = self.self_attn
        b, n, _ = x.shape
        if use_small_linear(x, rows=b * n) and attn.kernel_fits(x, cache_k):
            return self.token_forward(x, cos, sin, cache_k, cache_v, positions)
        x = x + attn(self.input_layernorm(x), cos, sin, cache_k, cache_v, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def token_forward(self, x, cos, sin, cache_k, cache_v, positions) -> torch.Tensor:
        """`forward` of a few new tokens (x [B, n, hidden], B * n rows in all) as 4 + n kernels: the
        norms, the gate and the residual adds ride in the projections (`predictor_kernels.
        small_linear`), which take all B * n rows at once."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        b, n, h = x.shape
        x = x.reshape(b * n, h)
        qkv = small_linear(x, attn.qkv_proj.weight, norm_weight=norm1.weight, eps=norm1.eps)
        out = attn.attend_tokens(qkv.view(b, n, -1), cos, sin, cache_k, cache_v, positions)
        x = small_linear(out.reshape(b * n, -1), attn.o_proj.weight, residual=x)
        gate_up = small_linear(x, mlp.gate_up_proj.weight, norm_weight=norm2.weight, eps=norm2.eps)
        return small_linear(gate_up, mlp.down_proj.weight, silu_mul=True, residual=x).view(b, n, h)


class CodePredictor(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        cp = cfg.code_predictor
        g = cp.decoder
        self.geometry = g
        self.num_residual = cfg.num_code_groups - 1
        self.seq_len = cfg.num_code_groups  # hidden state + 15 code embeddings
        self.layers = nn.ModuleList(DecoderLayer(g) for _ in range(g.num_layers))
        self.norm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.lm_head = nn.ModuleList(nn.Linear(g.hidden_size, cp.vocab_size, bias=False) for _ in range(self.num_residual))
        talker_hidden = cfg.decoder.hidden_size
        # 1.7B: talker states and embeddings (2048 wide) are projected to the predictor's 1024.
        self.small_to_mtp_projection = (
            nn.Linear(talker_hidden, g.hidden_size, bias=True) if talker_hidden != g.hidden_size else nn.Identity()
        )
        # fp32 tables of the 16 positions, indexed and cast to the activation dtype per call
        cos, sin = rope_cos_sin(torch.arange(self.seq_len), rope_inv_freq(g.head_dim, g.rope_theta), torch.float32)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("key_positions", torch.arange(self.seq_len), persistent=False)
        self._position_ids: list[torch.Tensor] | None = None
        # The steps and the sampler, eager here; `compile_steps()` swaps in compiled versions. None
        # depends on the codebook index, so each compiles once for all 15 sub-steps.
        self.first_step = self._first_step
        self.token_step = self._token_step
        self.sample = _sample

    def compile_steps(self) -> None:
        """torch.compile the steps and the sampler (dynamic batch size)."""
        self.first_step = torch.compile(self._first_step, dynamic=True)
        self.token_step = torch.compile(self._token_step, dynamic=True)
        self.sample = torch.compile(_sample, dynamic=True)

    def _new_cache(self, batch: int, dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = self.geometry
        shape = (batch, g.num_kv_heads, self.seq_len, g.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in self.layers]

    def _run(self, x: torch.Tensor, cache, positions: torch.Tensor) -> torch.Tensor:
        """Tokens x [B, n, H] at `positions` [n] (causal among themselves and over the cache)."""
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        mask = self.key_positions.unsqueeze(0) <= positions.unsqueeze(-1)
        for layer, (ck, cv) in zip(self.layers, cache):
            x = layer(x, cos, sin, ck, cv, positions, mask)
        return self.norm(x)

    def _token_step(self, x: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """One token per row, x [B, H], at `position` ([1] int64) -> final-normed output [B, H]."""
        return self._run(x.unsqueeze(1), cache, position)[:, -1]

    def _first_step(self, hidden: torch.Tensor, code0_embed: torch.Tensor, cache) -> torch.Tensor:
        """Positions 0 and 1 (the talker's state, code 0's embedding; [B, H] each) in one pass ->
        position 1's final-normed output [B, H]. Both are known once code 0 is drawn, and one pass
        over 2B rows costs about what one over B rows does (the weights are read once), where two
        token steps read them twice."""
        x = torch.stack((hidden, code0_embed), dim=1)
        return self._run(x, cache, self.key_positions[:2])[:, -1]

    def _positions(self, device) -> list[torch.Tensor]:
        # one persistent [1] tensor per position: compiled code sees the same kind of input at
        # every sub-step (no recompilation per position) and CUDA graphs see fixed addresses
        if self._position_ids is None or self._position_ids[0].device != device:
            self._position_ids = [torch.full((1,), p, dtype=torch.long, device=device) for p in range(self.seq_len)]
        return self._position_ids

    def predict(
        self,
        hidden: torch.Tensor,  # [B, H_talker] talker final-normed hidden state
        code0_embed: torch.Tensor,  # [B, H_talker] talker codec embedding of code 0
        residual_tables: nn.ModuleList,  # TalkerEmbeddings.residual_codec_embedding
        params: SamplingTensors,
        frame_index: torch.Tensor,  # [B] int64: draws are keyed by (seed, frame, codebook)
    ) -> torch.Tensor:
        """Codes 1..15 of the frame, [B, 15]."""
        b = hidden.shape[0]
        cache = self._new_cache(b, hidden.dtype, hidden.device)
        pos = self._positions(hidden.device)
        project = self.small_to_mtp_projection
        out = self.first_step(project(hidden), project(code0_embed), cache)
        # the sampler as one Triton kernel where it runs (on CUDA), else PyTorch's (compiled if
        # `compile_steps` ran): the same draws either way
        draw = fused_sample if kernels_enabled(hidden, "sampler") else self.sample
        codes = []
        for j in range(self.num_residual):
            code = draw(self.head_logits(j, out), params.temperature, params.top_k, params.top_p, params.seed,
                        frame_index * self.seq_len + j + 1)
            codes.append(code)
            if j + 1 < self.num_residual:
                out = self.token_step(project(residual_tables[j](code)), pos[j + 2], cache)
        return torch.stack(codes, dim=1)

    def head_logits(self, j: int, out: torch.Tensor) -> torch.Tensor:
        """Logits of codebook j + 1 from the final-normed outputs [B, H]."""
        head = self.lm_head[j]
        return small_linear(out, head.weight) if use_small_linear(out) else head(out)

    def teacher_forced_logits(
        self, hidden: torch.Tensor, codes: torch.Tensor, code0_embed: torch.Tensor, residual_tables: nn.ModuleList
    ) -> torch.Tensor:
        """Logits of codes 1..15 given the true frame in one causal pass; [B, 15, vocab]."""
        inputs = [hidden, code0_embed] + [residual_tables[j](codes[:, j + 1]) for j in range(self.num_residual - 1)]
        x = self.small_to_mtp_projection(torch.stack(inputs, dim=1))
        positions = self.key_positions[: x.shape[1]]
        out = self._run(x, self._new_cache(hidden.shape[0], hidden.dtype, hidden.device), positions)
        return torch.stack([self.lm_head[j](out[:, j + 1]) for j in range(self.num_residual)], dim=1).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """`talker.code_predictor.{model.layers,model.norm,lm_head,small_to_mtp_projection}.*` -> parameters.

        The predictor's input tables (`model.codec_embedding.*`) belong to `TalkerEmbeddings`.
        """
        prefix = "talker.code_predictor."
        g = self.geometry
        names = {name: prefix + ("model." + name if name.startswith(("layers.", "norm.")) else name)
                 for name, _ in self.named_parameters()}
        # the checkpoint's separate q/k/v and gate/up matrices -> rows of the fused ones
        rows = stacked_shard_rows(g.num_heads, g.num_kv_heads, g.head_dim, g.intermediate_size)
        return load_mapped(self, weights, stacked_name_map(names, rows))


def _sample(logits, temperature, top_k, top_p, seed, counter) -> torch.Tensor:
    # flat tensor arguments: what torch.compile traces most simply
    return sample(logits, SamplingTensors(temperature, top_k, top_p, seed), counter)

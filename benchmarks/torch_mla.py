"""The measured MLA operations written the way a PyTorch CPU engine writes them (a helper of run.py).

Float32 throughout: prefill in the naive form with ``F.scaled_dot_product_attention``
(causal), decode in the absorbed form against latent rows ``[normalised latent | rotated
k_pe]`` held in a preallocated buffer. RoPE angles come from ``mla_ref.rope.rope_angles``
(a [tokens, 32] table, negligible next to the matmuls). Outputs are compared with mla_ref's
in run.py, so a wrong shortcut here shows up as a large relative error, not as a fast row.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mla_ref.config import ModelConfig
from mla_ref.rope import rope_angles, softmax_scale


class TorchMLA:
    """One MLA layer in torch float32 with the weights of ``weights`` (relative names, float32 NumPy arrays, shared memory)."""

    def __init__(self, config: ModelConfig, weights: dict) -> None:
        self.config = config
        self.w = {name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)) for name, value in weights.items()}
        heads, nope, v_dim = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
        per_head = self.w["kv_b_proj.weight"].view(heads, nope + v_dim, config.kv_lora_rank)
        self.w_uk, self.w_uv = per_head[:, :nope], per_head[:, nope:]  # [heads, nope, rank], [heads, v, rank]
        self.scale = softmax_scale(config)
        self.query_chunk = 256

    def _rms(self, x: torch.Tensor, weight: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps) * self.w[weight]

    def _rope(self, x: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        cos, sin = (torch.from_numpy(a) for a in rope_angles(self.config, positions, np.float32))  # [batch, seq, rope_half]
        if x.dim() == 4:
            cos, sin = cos[:, :, None], sin[:, :, None]
        real, imag = x[..., 0::2], x[..., 1::2]
        return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)

    def _project(self, x: torch.Tensor, positions: np.ndarray):
        c = self.config
        q = F.linear(self._rms(F.linear(x, self.w["q_a_proj.weight"]), "q_a_layernorm.weight"), self.w["q_b_proj.weight"])
        q = q.unflatten(-1, (c.num_attention_heads, c.qk_head_dim))  # [batch, seq, heads, qk_head_dim]
        kv_a = F.linear(x, self.w["kv_a_proj_with_mqa.weight"])
        latent = self._rms(kv_a[..., : c.kv_lora_rank], "kv_a_layernorm.weight")
        k_pe = self._rope(kv_a[..., c.kv_lora_rank:], positions)
        return q[..., : c.qk_nope_head_dim], self._rope(q[..., c.qk_nope_head_dim:], positions), latent, k_pe

    @torch.inference_mode()
    def prefill(self, hidden: np.ndarray) -> np.ndarray:
        """Naive-form causal prefill from position 0: ``hidden [batch, seq, hidden_size]`` -> output."""
        c = self.config
        x = torch.from_numpy(hidden)
        batch, seq, _ = x.shape
        q_nope, q_pe, latent, k_pe = self._project(x, np.broadcast_to(np.arange(seq), (batch, seq)))
        kv = F.linear(latent, self.w["kv_b_proj.weight"]).unflatten(-1, (c.num_attention_heads, -1))
        k_nope, value = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [batch, heads, seq, qk_head_dim]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, c.num_attention_heads, -1)], dim=-1).transpose(1, 2)
        v = value.transpose(1, 2)  # [batch, heads, keys, v_head_dim]
        attn = torch.empty((batch, c.num_attention_heads, seq, c.v_head_dim), dtype=torch.float32)
        # qk_head_dim != v_head_dim: CPU SDPA takes its unfused path, which holds [heads, seq, seq]
        # probabilities (32 GiB at T = 8192), so queries go in chunks, keys up to the chunk's last
        for start in range(0, seq, self.query_chunk):
            stop = min(seq, start + self.query_chunk)
            mask = torch.arange(stop)[None, :] <= torch.arange(start, stop)[:, None]  # [chunk, keys] causal
            attn[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop],
                                                                    attn_mask=mask, scale=self.scale)
        return F.linear(attn.transpose(1, 2).flatten(2), self.w["o_proj.weight"]).numpy()

    def latent_rows(self, rows: np.ndarray, capacity: int) -> torch.Tensor:
        """A ``[batch, capacity, width]`` buffer holding ``rows`` first (the absorbed form's cache)."""
        buffer = torch.zeros((rows.shape[0], capacity, rows.shape[2]), dtype=torch.float32)
        buffer[:, : rows.shape[1]] = torch.from_numpy(rows)
        return buffer

    @torch.inference_mode()
    def decode(self, hidden: np.ndarray, rows: torch.Tensor, length: int) -> np.ndarray:
        """Absorbed-form decode of one token per sequence at position ``length``; writes its row into ``rows``."""
        c = self.config
        x = torch.from_numpy(hidden)  # [batch, 1, hidden_size]
        batch = x.shape[0]
        q_nope, q_pe, latent, k_pe = self._project(x, np.full((batch, 1), length))
        rows[:, length] = torch.cat([latent, k_pe], dim=-1)[:, 0]
        keys = rows[:, : length + 1]  # [batch, keys, width]
        q_latent = torch.cat([torch.einsum("bshd,hdc->bshc", q_nope, self.w_uk), q_pe], dim=-1)[:, 0]  # [batch, heads, width]
        probs = torch.softmax(self.scale * (q_latent @ keys.transpose(1, 2)), dim=-1)  # [batch, heads, keys]
        out_latent = probs @ keys[..., : c.kv_lora_rank]  # [batch, heads, kv_lora_rank]
        attn = torch.einsum("bhc,hdc->bhd", out_latent, self.w_uv)  # [batch, heads, v_head_dim]
        return F.linear(attn.flatten(1), self.w["o_proj.weight"])[:, None].numpy()

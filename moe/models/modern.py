"""The modern decoder block's parts: RMSNorm, rotary position embeddings and grouped-query attention.

The maths follows Hugging Face's Llama family exactly (so imported Mixtral, Qwen3-MoE, OLMoE and
GLM-4-MoE checkpoints give the same logits): RMSNorm in fp32 and cast back before the weight;
RoPE in the ``rotate_half`` convention (the first and second halves of the rotated dimensions are
a pair), cos and sin made in fp32 from integer positions and cast to the activations' dtype, the
first ``rotary_dim`` dimensions of each head rotated and the rest passed on (GLM-4-MoE's partial
rotary); query heads share key/value heads in consecutive groups (``repeat_kv``).
Shape legend: B batch, S sequence, Q query rows, K key rows, D model width, H query heads,
G key/value heads, Dh head width, R rotated dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamoe.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the mean of squares taken in fp32 (as Llama's, bit for bit)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(cfg: ModelConfig, width: int | None = None) -> nn.Module:
    """The block's norm over ``width`` (default d_model): LayerNorm or RMSNorm, ``cfg.norm_eps``."""
    width = cfg.d_model if width is None else width
    if cfg.norm_kind == "rmsnorm":
        return RMSNorm(width, cfg.norm_eps)
    return nn.LayerNorm(width, eps=cfg.norm_eps)


def rotary_cos_sin(pos_BS: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin [B, 1, S, R] for positions ``pos`` (any integers: packed or gathered tokens keep
    their sequence positions), computed in fp32 as Hugging Face's default RoPE does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=pos_BS.device) / rotary_dim))
    freqs = pos_BS[..., None].float() * inv_freq  # (B, S, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, R)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BHSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dimensions of every head; the others pass unchanged."""
    R = cos.shape[-1]
    if R == x_BHSD.shape[-1]:
        return x_BHSD * cos + rotate_half(x_BHSD) * sin
    rot, keep = x_BHSD[..., :R], x_BHSD[..., R:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)


class GroupedQueryAttention(nn.Module):
    """Self-attention with H query heads sharing G key/value heads, separate q/k/v/o projections
    (Hugging Face's names and layouts, so importing a checkpoint is a renaming), optional QK-norm,
    clipping and biases, and rotary positions. Same calls as the GPT-2 block's ``SelfAttention``:
    the whole sequence, or some query rows against some key rows with explicit positions."""

    def __init__(self, cfg: ModelConfig, causal: bool, out_init_std: float):
        super().__init__()
        self.causal = causal
        self.dropout = cfg.dropout
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        self.q_width = self.n_heads * self.head_dim  # read by the FLOP counts
        self.kv_width = self.n_kv_heads * self.head_dim
        self.rope = cfg.position_kind == "rope"
        self.rotary_dim, self.rope_theta = cfg.rotary_dim, cfg.rope_theta
        self.clip = cfg.clip_qkv
        self.qk_norm = cfg.qk_norm
        D = cfg.d_model
        self.q_proj = nn.Linear(D, self.q_width, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, self.kv_width, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, self.kv_width, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_width, D, bias=cfg.out_bias)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(proj.weight, std=out_init_std if proj is self.o_proj else 0.02)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.q_norm = self.k_norm = None
        if self.qk_norm == "per_head":
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps), RMSNorm(self.head_dim, cfg.norm_eps)
        elif self.qk_norm == "whole":
            self.q_norm, self.k_norm = RMSNorm(self.q_width, cfg.norm_eps), RMSNorm(self.kv_width, cfg.norm_eps)

    def _heads(self, t_BSW: torch.Tensor, norm: nn.Module | None, heads: int) -> torch.Tensor:
        """A projection's output [B, S, heads * Dh] as heads [B, heads, S, Dh], normed and clipped."""
        B, S, _ = t_BSW.shape
        if self.qk_norm == "whole" and norm is not None:
            t_BSW = norm(t_BSW)  # OLMoE: over the whole width, before the head split
        if self.clip is not None:
            t_BSW = t_BSW.clamp(-self.clip, self.clip)
        t = t_BSW.view(B, S, heads, self.head_dim)
        if self.qk_norm == "per_head" and norm is not None:
            t = norm(t)
        return t.transpose(1, 2)  # (B, heads, S, Dh)

    def _rotate(self, t_BHSD: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
        if not self.rope:
            return t_BHSD
        cos, sin = rotary_cos_sin(pos_BS, self.rotary_dim, self.rope_theta, t_BHSD.dtype)
        return apply_rotary(t_BHSD, cos, sin)

    def _attention(self, q, k, v, attn_mask=None, is_causal=False) -> torch.Tensor:
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.head_dim**-0.5,
            enable_gqa=self.n_kv_heads != self.n_heads,  # query head h reads key/value head h // (H / G)
        )
        B, _, Q, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, Q, self.q_width))

    def forward(
        self,
        x_BSD: torch.Tensor,
        key_mask_BS: torch.Tensor | None = None,
        *,
        rows: tuple | None = None,
        positions: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Every token of ``x`` attends to the others (``positions`` [B, S]: their sequence
        positions, ascending; default 0..S-1), or, with ``rows``, :meth:`attend`, or, with
        ``cache``, :meth:`attend_cached`."""
        if cache is not None:
            return self.attend_cached(x_BSD, cache)
        if rows is not None:
            return self.attend(x_BSD, *rows)
        B, S, _ = x_BSD.shape
        if positions is None:
            positions = torch.arange(S, device=x_BSD.device).expand(B, S)
        q = self._rotate(self._heads(self.q_proj(x_BSD), self.q_norm, self.n_heads), positions)
        k = self._rotate(self._heads(self.k_proj(x_BSD), self.k_norm, self.n_kv_heads), positions)
        v = self._heads(self.v_proj(x_BSD), None, self.n_kv_heads)
        if key_mask_BS is None:
            return self._attention(q, k, v, is_causal=self.causal)
        allowed = key_mask_BS[:, None, :].bool().expand(B, S, S)  # (B, Q, K)
        if self.causal:
            allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()
        allowed = allowed | torch.eye(S, dtype=torch.bool, device=x_BSD.device)  # no empty row for padding
        return self._attention(q, k, v, attn_mask=allowed[:, None])

    def attend(
        self,
        xq_BQD: torch.Tensor,
        q_pos_BQ: torch.Tensor,
        xkv_BKD: torch.Tensor,
        k_pos_BK: torch.Tensor,
        k_valid_BK: torch.Tensor | None,
    ) -> torch.Tensor:
        """Some query rows against some key rows, each rotated by its own sequence position (causal
        order by position); ``k_valid`` marks real keys. Q and the output projection run on the
        queries only, K and V on the keys only."""
        q = self._rotate(self._heads(self.q_proj(xq_BQD), self.q_norm, self.n_heads), q_pos_BQ)
        k = self._rotate(self._heads(self.k_proj(xkv_BKD), self.k_norm, self.n_kv_heads), k_pos_BK)
        v = self._heads(self.v_proj(xkv_BKD), None, self.n_kv_heads)
        B, Q, K = xq_BQD.shape[0], xq_BQD.shape[1], xkv_BKD.shape[1]
        allowed = torch.ones(B, Q, K, dtype=torch.bool, device=xq_BQD.device)
        if self.causal:
            allowed = k_pos_BK[:, None, :] <= q_pos_BQ[:, :, None]
        if k_valid_BK is not None:
            allowed = allowed & k_valid_BK[:, None, :].bool()
        # A query always sees itself, so padding queries have no empty row (no NaN to mask later).
        allowed = allowed | (k_pos_BK[:, None, :] == q_pos_BQ[:, :, None])
        return self._attention(q, k, v, attn_mask=allowed[:, None])

    def attend_cached(self, x_BnD: torch.Tensor, cache) -> torch.Tensor:
        """New tokens ``x`` [B, n, D] at the cache step's positions against every cached key at or
        before their position. Keys are cached after QK-norm and rotation, so each is rotated once,
        by its own position, exactly as a full pass rotates it."""
        pos = cache.positions
        q = self._rotate(self._heads(self.q_proj(x_BnD), self.q_norm, self.n_heads), pos)
        k = self._rotate(self._heads(self.k_proj(x_BnD), self.k_norm, self.n_kv_heads), pos)
        v = self._heads(self.v_proj(x_BnD), None, self.n_kv_heads)
        k_all, v_all = cache.append(k, v)
        return self._attention(q, k_all, v_all, attn_mask=cache.mask)

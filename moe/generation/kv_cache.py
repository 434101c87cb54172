"""A preallocated key/value cache for incremental decoding of dynamoe's decoders (both blocks).

Layout: ``k`` and ``v`` are [layers, B, G, capacity, Dh] (G key/value heads: the GPT-2 block's
heads, the modern block's grouped-query KV heads), allocated once per batch. Slot ``p`` of row
``b`` holds the token at sequence position ``p`` of that row: positions are true positions, so
learned position embeddings and RoPE see exactly what a full pass gives them, and rows of
different lengths need no left padding. ``lengths`` [B] counts each row's valid slots.

A step writes the new tokens' keys and values at their positions, then lets each query read the
slots at or before its own position. Slots after a row's length may hold anything (the padding of
a shorter prompt, a speculative draft that was rejected): a query never reads a slot after its
own position, and a slot is always written before a query at that position reads it, so rolling
back is only lowering ``lengths``. Keys are stored as attention uses them (the modern block's
after QK-norm and rotation), so each token's key is computed and rotated once.
Shape legend: L layers, B batch, G key/value heads, C capacity, Dh head width, n new tokens per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheStep:
    """One cached forward over ``n`` new tokens per row, shared by every layer it runs."""

    positions: torch.Tensor  # [B, n] sequence position (= slot) of each new token
    index: torch.Tensor  # [B, 1, n, 1] the positions as a scatter index over the slot dimension
    mask: torch.Tensor  # [B, 1, n, span] bool: query may read slot (slot <= its position)
    span: int  # slots read: one past the largest position


class LayerCache:
    """What one attention layer gets for a step: its own key/value buffers and the step."""

    def __init__(self, k_BGCD: torch.Tensor, v_BGCD: torch.Tensor, step: CacheStep):
        self.k, self.v, self.step = k_BGCD, v_BGCD, step

    @property
    def positions(self) -> torch.Tensor:
        return self.step.positions

    @property
    def mask(self) -> torch.Tensor:
        return self.step.mask

    def append(self, k_BGnD: torch.Tensor, v_BGnD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys and values at their positions; return the slots they may read."""
        G, Dh = k_BGnD.shape[1], k_BGnD.shape[-1]
        idx = self.step.index.expand(-1, G, -1, Dh)
        self.k.scatter_(2, idx, k_BGnD.to(self.k.dtype))
        self.v.scatter_(2, idx, v_BGnD.to(self.v.dtype))
        span = self.step.span
        return self.k[:, :, :span], self.v[:, :, :span]


class KVCache:
    """Keys and values of every attention layer of a decoder for a batch of sequences."""

    def __init__(
        self,
        layers: int,
        batch: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> KVCache:
        """A cache shaped for ``model`` (a ``TransformerLM`` of either block), in its dtype and device."""
        cfg = model.cfg
        # The GPT-2 block has no grouped-query options: kv_heads and attn_head_dim give its own heads.
        heads, head_dim = cfg.kv_heads, cfg.attn_head_dim
        weight = model.tok_emb.weight
        return cls(cfg.n_layers, batch, capacity, heads, head_dim, dtype=weight.dtype, device=weight.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def positions(self, n: int, offset: int = 0) -> torch.Tensor:
        """[B, n]: the positions of ``n`` tokens written right after each row's valid slots (plus ``offset``)."""
        return self.lengths[:, None] + offset + torch.arange(n, device=self.lengths.device)

    def step(self, positions_Bn: torch.Tensor) -> CacheStep:
        """The step that writes new tokens at ``positions`` (each row's own) and reads up to them."""
        span = int(positions_Bn.max()) + 1
        if span > self.capacity or int(positions_Bn.min()) < 0:
            raise ValueError(
                f"positions up to {span - 1} do not fit a cache of {self.capacity} slots; "
                "fix: allocate the cache for the longest prompt plus the tokens to generate"
            )
        slots = torch.arange(span, device=positions_Bn.device)
        mask = slots[None, None, :] <= positions_Bn[:, :, None]  # (B, n, span)
        return CacheStep(positions_Bn, positions_Bn[:, None, :, None], mask[:, None], span)

    def layer(self, i: int, step: CacheStep) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], step)

    def advance(self, counts_B: torch.Tensor | int) -> None:
        """Mark ``counts`` more slots of each row valid (the tokens just written and kept)."""
        self.lengths = self.lengths + counts_B

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (finished sequences leave it, so no step computes them)."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.lengths = self.lengths.index_select(0, rows)

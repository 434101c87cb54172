"""Conditional depth: halting (ACT, PonderNet), gated block skipping, mixture-of-depths routing.

The per-unit pieces live in ``halting.py``, ``skipping.py`` and ``mixture_of_depths.py``; how they
run over a Transformer's layers is ``transformer_modes.py`` and over a CNN's blocks ``cnn_modes.py``. Every
conditional unit reports what it really computed in a :class:`DepthAux` (``records.py``), so
compute per token is read the same way for every mode, with MoE layers and exits.
"""

from dynamoe.depth.records import DepthAux, depth_loss, depth_summary

__all__ = ["DepthAux", "depth_loss", "depth_summary"]

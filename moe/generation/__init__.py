"""Text generation with a KV cache for dynamoe's decoders, self-speculative decoding with their
early exits, and per-token early exit (CALM) with calibrated thresholds (``docs/generation.md``)."""

from dynamoe.generation.calm import CalmStats, calm_generate
from dynamoe.generation.decode import GenerationResult, GenerationStats, check_decodable, generate
from dynamoe.generation.kv_cache import KVCache
from dynamoe.generation.sampling import GenerationError, SamplingConfig
from dynamoe.generation.speculative import draft_exit, speculative_generate

__all__ = [
    "CalmStats",
    "GenerationError",
    "GenerationResult",
    "GenerationStats",
    "KVCache",
    "SamplingConfig",
    "calm_generate",
    "check_decodable",
    "draft_exit",
    "generate",
    "speculative_generate",
]

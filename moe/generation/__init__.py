"""Text generation with a KV cache for dynamoe's decoders, and self-speculative decoding with
their early exits (``docs/generation.md``)."""

from dynamoe.generation.decode import GenerationResult, GenerationStats, check_decodable, generate
from dynamoe.generation.kv_cache import KVCache
from dynamoe.generation.sampling import GenerationError, SamplingConfig
from dynamoe.generation.speculative import draft_exit, speculative_generate

__all__ = [
    "GenerationError",
    "GenerationResult",
    "GenerationStats",
    "KVCache",
    "SamplingConfig",
    "check_decodable",
    "draft_exit",
    "generate",
    "speculative_generate",
]

"""The sparse batched decoding engine (see docs/decoding.md).

Build an engine from a loaded Hugging Face model (``DecodeEngine.from_hf``) or at real shape with
random weights (``DecodeEngine.random``), with a :class:`DecodePlan` from :func:`build_plan`, then
``engine.generate(prompts, max_new_tokens=...)``.
"""

from polar_sparsity.decode.engine import DecodeEngine
from polar_sparsity.decode.generate import Generation, decode_one_token, generate, prefill, sample
from polar_sparsity.decode.kv_cache import StaticKVCache
from polar_sparsity.decode.ops import BACKENDS, DecodeOps, resolve_backend
from polar_sparsity.decode.plan import DecodePlan, build_plan

__all__ = [
    "BACKENDS",
    "DecodeEngine",
    "DecodeOps",
    "DecodePlan",
    "Generation",
    "StaticKVCache",
    "build_plan",
    "decode_one_token",
    "generate",
    "prefill",
    "resolve_backend",
    "sample",
]

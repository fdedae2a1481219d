"""Text generation: prefill + a compiled `lax.while_loop` decode over an explicit KV cache, sampling with
transformers' logits-processor semantics, streaming, and the `generate` / `chat` command-line programs."""

from deepseek_vl_jax.generation.generate import GenerateOutput, generate
from deepseek_vl_jax.generation.kv_cache import bucket_length, gen_buffer_length, init_cache
from deepseek_vl_jax.generation.loop import DecodeState, compile_count
from deepseek_vl_jax.generation.sampling import Sampler, SamplingParams, process_logits, sample
from deepseek_vl_jax.generation.streamer import TextStreamer, TokenCollector

__all__ = [
    "DecodeState", "GenerateOutput", "Sampler", "SamplingParams", "TextStreamer", "TokenCollector", "bucket_length", "compile_count",
    "gen_buffer_length", "generate", "init_cache", "process_logits", "sample",
]

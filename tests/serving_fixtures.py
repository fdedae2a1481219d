"""Tiny model directories for the serving tests: a transformers checkpoint (hf_fixtures) saved with a tiny processor
(processing_fixtures), the model's vocabulary, image token and bos/eos/pad ids made to fit the processor's tokenizer;
DeepSeek-VL and DeepSeek-VL-Hybrid. (`generation_checkpoints` has no processor: a server needs one.)"""

from __future__ import annotations

import base64
import io

import hf_fixtures as F
import processing_fixtures as PF


def build_model_dir(path, kind: str) -> str:
    hybrid = kind == "hybrid"
    PF.make_processor_dir(path, hybrid=hybrid, num_image_tokens=16, image_size=32, high_res_size=64)
    from deepseek_vl_jax.processing import load_processor

    proc = load_processor(path)
    vocab = -(-proc.tokenizer.get_vocab_size() // 32) * 32
    cfg = F.make_config(hybrid=hybrid, text={"vocab_size": vocab, "bos_token_id": proc.bos_token_id,
                                             "eos_token_id": proc.eos_token_id, "pad_token_id": proc.pad_token_id,
                                             "max_position_embeddings": 512})
    cfg.image_token_id = proc.image_token_id
    F.save(F.perturb(F.make_model(cfg, seed=2 if not hybrid else 4), seed=9, scale=0.2), path)
    return str(path)


def image_data_url(seed: int, height: int = 40, width: int = 56) -> str:
    buf = io.BytesIO()
    PF.random_image(height, width, seed=seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pil_image(seed: int, height: int = 40, width: int = 56):
    return PF.random_image(height, width, seed=seed)

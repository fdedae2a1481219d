"""Do the default programs stay the same? Lowers the plain forward (`Model.__call__` without options) and the default
generate program (greedy, no stop strings / min_new_tokens / logprobs; where it exists, also its prefill and decode
programs, which CPU generate runs) of a tiny model with the code at --root, and
prints a hash of their StableHLO text. Run once with the current tree and once with an older checkout:
identical hashes mean identical compiled programs, hence identical speed (a measurement that no machine load skews).

    python benchmarks/default_programs.py --root OLD_CHECKOUT --out a.json; python benchmarks/default_programs.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    import jax
    import jax.numpy as jnp

    import deepseek_vl_jax as D
    from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights

    assert D.__file__.startswith(os.path.abspath(args.root)), D.__file__
    text = {"vocab_size": 160, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    vision = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8, "vision_use_head": False}
    config = D.ModelConfig.from_hf({"model_type": "deepseek_vl", "text_config": text, "vision_config": vision,
                                    "image_token_id": 150})
    model = D.Model(config, D.init_params(config, jax.random.key(0)))
    ids = jnp.ones((2, 64), jnp.int32).at[:, :16].set(150)
    mask = jnp.ones((2, 64), jnp.int32)
    px = jnp.zeros((1, 3, 32, 32), jnp.float32)
    forward = model._forward.lower(model.params, ids, mask, px, None).as_text()
    sampler = sampling.Sampler.create(False, 1.0, 0, 1.0, 1.0)
    sp = sampling.SamplingParams.create()
    stop = loop.StopParams(eos=jnp.full((8,), -1, jnp.int32), pad=jnp.int32(0), max_new_tokens=jnp.int32(32))
    progs = loop.programs(config, sampler, None)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": px}
    gen = progs.generate.lower(weights.generation_params(model), inputs, jax.random.key(0), sp, stop,
                               kv_cache.gen_buffer_length(32)).as_text()
    strip = lambda s: "\n".join(l for l in s.splitlines() if not l.lstrip().startswith("loc"))  # source locations
    strip_loc = lambda s: __import__("re").sub(r" loc\(#loc\d*\)|#loc\d* = loc\(.*\)", "", strip(s))
    report = dict(report=True, top_logprobs=2)
    with_logprobs = loop.programs(config, sampler, None, loop.Extras(**report)) if hasattr(loop, "Extras") else None
    programs = [("plain_forward", forward), ("default_generate", gen)]
    if getattr(progs, "decode", None) is not None:  # generate as two programs (`loop.SplitGenerate`, CPU default)
        a = (weights.generation_params(model), inputs, jax.random.key(0), sp, stop, kv_cache.gen_buffer_length(32))
        state = progs.prefill.eval_shape(*a)
        programs += [("default_prefill", progs.prefill.lower(*a).as_text()),
                     ("default_decode", progs.decode.lower(a[0], state, sp, stop).as_text())]
    if with_logprobs is not None:  # a control: a program that does differ hashes differently
        programs.append(("generate_with_logprobs", with_logprobs.generate.lower(
            weights.generation_params(model), inputs, jax.random.key(0), sp, stop, 64).as_text()))
    result = {name: {"sha256_16": hashlib.sha256(strip_loc(t).encode()).hexdigest()[:16],
                     "hlo_chars": len(strip_loc(t))} for name, t in programs}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()

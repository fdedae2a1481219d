"""Parity of deepseek_vl_jax.sam with transformers 5.23.0 `SamVisionEncoder` (float32, CPU).

Tolerance: max relative error max|ours - HF| / max|HF| <= 1e-5 (RTOL) for every compared tensor, unless a test says
otherwise. HF weights are perturbed (SAM initialises linears with std 1e-10, rel-pos tables and pos_embed to zero and
norms to ones), so every parameter changes the output.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SamVisionConfig, SamVisionModel
from transformers.models.sam.modeling_sam import SAM_VISION_ATTENTION_CLASSES
from transformers.models.sam.modeling_sam import SamVisionAttention as HFSamVisionAttention
from transformers.models.sam.modeling_sam import SamVisionLayer as HFSamVisionLayer

from deepseek_vl_jax.config import SamConfig
from deepseek_vl_jax.hf_mapping import hf_to_flax
from deepseek_vl_jax.sam import (SamVisionAttention, SamVisionEncoder, get_rel_pos, window_partition,
                                 window_unpartition)

RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# helpers (also imported by test_high_res.py)


def rel_err(ours, ref) -> float:
    """max|a - b| / max|b|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def perturb_(module: torch.nn.Module, seed: int, overrides: dict[str, float] | None = None) -> None:
    """Add random noise to every parameter, scaled so nothing is negligible (linears/convs ~ 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    overrides = overrides or {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in overrides:
                p.fill_(overrides[name])
                continue
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "rel_pos" in name or "pos_embed" in name:
                p.add_(0.5 * noise)
            elif p.ndim >= 2:
                p.add_(noise * float(np.prod(p.shape[1:])) ** -0.5)
            else:  # norm scales (init 1), biases (init 0)
                p.add_(0.2 * noise)


def hf_to_flax_params(state: dict, template, prefix: str = "") -> dict:
    """Load the HF tensors under `prefix` into a Flax param tree with the library's converter, by name.

    `deepseek_vl_jax.hf_mapping.hf_to_flax` maps full transformers names (`a.b.3.c.weight` -> `a/b_3/c/kernel`,
    Linear transposed, Conv OIHW -> HWIO, norm `weight` -> `scale`, other tensors as is) and raises unless every HF
    key is used and every Flax leaf is filled with the right shape. A standalone module's keys are given a
    top-level name the converter does not special-case (`model._module_.` <-> Flax `_module_/`).
    """
    tensors = {f"model._module_.{k[len(prefix):]}": v.detach().cpu().numpy() if isinstance(v, torch.Tensor)
               else np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
    assert tensors, f"no HF keys under {prefix!r}"
    params = hf_to_flax(tensors, {"_module_": nn.unbox(template)})["_module_"]
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    expected = flax.traverse_util.flatten_dict(nn.unbox(template), sep="/")
    assert set(flat) == set(expected) and all(flat[k].shape == expected[k].shape for k in flat)
    return params


def sam_configs(**kw) -> tuple[SamVisionConfig, SamConfig]:
    """A tiny SAM: hidden 32, 2 heads, 4 layers, 64 px / patch 8 -> 8x8 tokens, window 3 (pads 8 -> 9)."""
    base = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=4, image_size=64, patch_size=8,
                window_size=3, global_attn_indexes=(1, 3), output_channels=16, mlp_dim=48)
    base.update(kw)
    attn = base.pop("attn_implementation", None)
    hf = SamVisionConfig(**{**base, "global_attn_indexes": list(base["global_attn_indexes"])})
    if attn is not None:
        hf._attn_implementation = attn
    ours = SamConfig(**{k: v for k, v in base.items()})
    return hf, ours


# ---------------------------------------------------------------------------------------------------------------
# the encoder


CASES = {
    # window 3 on an 8x8 grid: every windowed layer pads to 9x9. Compared with both HF attention implementations.
    "base": dict(),
    "no-rel-pos": dict(use_rel_pos=False),
    # layer_norm_eps large so that using it in the neck (HF: always 1e-6) would show; global first, window 5.
    "no-abs-pos": dict(use_abs_pos=False, layer_norm_eps=1e-2, global_attn_indexes=(0, 2), window_size=5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_matches_hf(case):
    """Neck output and all hidden states vs HF SamVisionModel(output_hidden_states=True) with the eager and the
    sdpa attention; max rel err <= 1e-5."""
    hf_cfg, cfg = sam_configs(**CASES[case])
    torch.manual_seed(0)
    hf = SamVisionModel(hf_cfg).eval()
    perturb_(hf, seed=1)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)

    model = SamVisionEncoder(cfg)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))["params"]
    params = hf_to_flax_params(hf.state_dict(), template, prefix="vision_encoder.")
    neck_out, hidden = jax.jit(model.apply)({"params": params}, jnp.asarray(pixels))
    assert neck_out.shape == (2, 8, 8, 16)
    assert len(hidden) == cfg.num_hidden_layers + 1

    for impl in ("eager", "sdpa"):
        impl_cfg, _ = sam_configs(**CASES[case], attn_implementation=impl)
        hf_impl = SamVisionModel(impl_cfg).eval()
        hf_impl.load_state_dict(hf.state_dict())
        assert type(hf_impl.vision_encoder.layers[0].attn).__name__ == {"eager": "SamVisionAttention",
                                                                        "sdpa": "SamVisionSdpaAttention"}[impl]
        with torch.no_grad():
            ref = hf_impl(torch.from_numpy(pixels), output_hidden_states=True)
        neck_err = rel_err(neck_out, ref.last_hidden_state.numpy().transpose(0, 2, 3, 1))
        assert neck_err <= RTOL, f"{impl}: neck output rel err {neck_err:.2e}"
        assert len(ref.hidden_states) == len(hidden)
        errs = []
        for i, (ours, theirs) in enumerate(zip(hidden, ref.hidden_states)):
            assert ours.shape == (2, 8, 8, 32)
            errs.append(rel_err(ours, theirs.numpy()))
            assert errs[-1] <= RTOL, f"{impl}: hidden state {i} rel err {errs[-1]:.2e}"
        print(f"{case}/{impl}: neck rel err {neck_err:.2e}, max hidden-state rel err {max(errs):.2e}")

    if case == "base":
        # keep_hidden returns exactly the selected states (negative indices from the end), in the given order
        # (a different jit program, so equal up to float32 rounding: rel err <= 1e-6).
        apply = jax.jit(model.apply, static_argnames="keep_hidden")
        neck2, kept = apply({"params": params}, jnp.asarray(pixels), keep_hidden=(2, 0, -1))
        assert len(kept) == 3
        assert rel_err(neck2, neck_out) <= 1e-6
        for ours, i in zip(kept, (2, 0, 4)):
            assert rel_err(ours, hidden[i]) <= 1e-6


def test_encoder_rejects_bad_inputs():
    _, cfg = sam_configs()
    model = SamVisionEncoder(cfg)
    with pytest.raises(ValueError, match="image size"):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 72, 72)))
    with pytest.raises(ValueError, match="keep_hidden"):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 64, 64)), keep_hidden=(5,))


def test_every_param_has_logical_axes():
    _, cfg = sam_configs()
    boxed = jax.eval_shape(SamVisionEncoder(cfg).init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) == 3 + 4 * 14 + 6  # patch conv (2) + pos_embed, 14 per layer, neck 6
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)


# ---------------------------------------------------------------------------------------------------------------
# windows and relative positions


@pytest.mark.parametrize("shape,window", [((2, 8, 7, 5), 3), ((1, 6, 6, 4), 3), ((2, 5, 9, 3), 4)])
def test_window_partition_round_trip(shape, window):
    """Partition equals HF's exactly (padding included) and unpartition inverts it."""
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    windows, padded = window_partition(jnp.asarray(x), window)
    ref_windows, ref_padded = HFSamVisionLayer.window_partition(None, torch.from_numpy(x), window)
    assert padded == tuple(ref_padded)
    assert padded[0] % window == 0 and padded[1] % window == 0
    np.testing.assert_array_equal(np.asarray(windows), ref_windows.numpy())
    back = window_unpartition(windows, window, padded, shape[1:3])
    np.testing.assert_array_equal(np.asarray(back), x)


@pytest.mark.parametrize("q,k,length", [(4, 4, 9), (4, 4, 7), (7, 7, 5), (6, 6, 21), (3, 5, 7), (5, 3, 9),
                                        (4, 6, 15), (6, 4, 5), (14, 14, 27)])
def test_get_rel_pos_matches_hf(q, k, length):
    """HF's get_rel_pos incl. the F.interpolate(linear) resize and unequal q/k; max abs err <= 1e-6."""
    table = np.random.default_rng(q * 100 + k * 10 + length).standard_normal((length, 8)).astype(np.float32)
    ref = HFSamVisionAttention.get_rel_pos(None, q, k, torch.from_numpy(table)).numpy()
    ours = np.asarray(get_rel_pos(q, k, jnp.asarray(table)))
    assert ours.shape == ref.shape == (q, k, 8)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_attention_with_resized_rel_pos_tables(attn_impl):
    """Tables made for a 5x5 window (9 rows) used on a 4x6 grid: h resized 9 -> 7, w 9 -> 11. Not reachable
    through the HF encoder (its grids always match the tables), so exercised at the attention level."""
    hf_cfg, cfg = sam_configs(attn_implementation=attn_impl)
    torch.manual_seed(0)
    hf = SAM_VISION_ATTENTION_CLASSES[attn_impl](hf_cfg, window_size=5).eval()
    perturb_(hf, seed=3)
    x = np.random.default_rng(2).standard_normal((2, 4, 6, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x))[0].numpy()
    model = SamVisionAttention(cfg, input_size=(5, 5))
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 6, 32)))["params"]
    params = hf_to_flax_params(hf.state_dict(), template)
    ours = model.apply({"params": params}, jnp.asarray(x))
    err = rel_err(ours, ref)
    assert err <= RTOL, f"rel err {err:.2e}"
    # the relative-position bias matters here (zeroing the tables changes the output)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "rel_pos" in jax.tree_util.keystr(p) else v, params)
    assert rel_err(model.apply({"params": zeroed}, jnp.asarray(x)), ref) > 1e-2

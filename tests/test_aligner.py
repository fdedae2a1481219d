"""Aligner parity with transformers (float32; max rel error <= 1e-5)."""

import jax
import numpy as np
import torch
from flax.core import meta
from transformers.models.deepseek_vl.modeling_deepseek_vl import DeepseekVLAligner
from transformers.models.deepseek_vl_hybrid.modeling_deepseek_vl_hybrid import DeepseekVLHybridAligner

from deepseek_vl_jax.aligner import HybridAligner, MlpAligner
from deepseek_vl_jax.hf_mapping import hf_to_flax

import hf_fixtures as F

TOL = 1e-5


def _params(ref, template_fn):
    tensors = {"model.aligner." + k: v.numpy() for k, v in ref.state_dict().items()}
    return hf_to_flax(tensors, {"aligner": template_fn()})["aligner"]


def test_mlp_aligner_matches_transformers():
    cfg = F.make_config()
    torch.manual_seed(0)
    ref = F.perturb(DeepseekVLAligner(cfg).eval())
    x = np.random.default_rng(0).standard_normal((2, 16, 48)).astype(np.float32)
    module = MlpAligner(64)
    params = _params(ref, lambda: meta.unbox(module.init(jax.random.key(0), x)["params"]))
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = module.apply({"params": params}, x)
    assert got.shape == (2, 16, 64)
    assert F.max_rel_err(got, want) <= TOL


def test_hybrid_aligner_matches_transformers():
    cfg = F.make_config(hybrid=True)
    torch.manual_seed(0)
    ref = F.perturb(DeepseekVLHybridAligner(cfg).eval())
    rng = np.random.default_rng(0)
    low = rng.standard_normal((2, 16, 48)).astype(np.float32)
    high = rng.standard_normal((2, 16, 64)).astype(np.float32)
    module = HybridAligner(64)
    params = _params(ref, lambda: meta.unbox(module.init(jax.random.key(0), low, high)["params"]))
    with torch.no_grad():
        want = ref(torch.from_numpy(low), torch.from_numpy(high)).numpy()
    got = module.apply({"params": params}, low, high)
    assert F.max_rel_err(got, want) <= TOL

"""Against PEFT on transformers' model, same weights and adapters: PEFT loads the adapter directory this project
writes (LoRA on the language model and SigLIP, the aligner fully trained) and gives the same logits; the adapters'
gradients equal torch autograd's; an adapter PEFT wrote loads with `load_pretrained(base, adapter=DIR)`."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from deepseek_vl_jax import lora
from deepseek_vl_jax.lora import peft_io
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.pretrained import load_pretrained
from deepseek_vl_jax.training import step as ST

import hf_fixtures as F
from test_training_step import make_labels

TARGETS = lora.LANGUAGE_TARGETS + (r"vision_model/layers/self_attn/(q|v)_proj",)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    cfg = F.make_config(tie=False)
    path = F.save(F.make_model(cfg, seed=4), tmp_path_factory.mktemp("peft_base"))
    model = load_pretrained(path, progress=False)
    config = lora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    params = lora.adapters.add_adapters(model.params, config, jax.random.key(3), zero_b=False)
    params["aligner"] = jax.tree.map(lambda x: x * 1.1 + 0.01, params["aligner"])  # "fully trained"
    adapter = peft_io.save_adapter(str(tmp_path_factory.mktemp("adapter")), params, config, towers=("aligner",))
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 3)), text_len=6)
    inputs["labels"] = make_labels(inputs)
    return path, model, config, params, adapter, inputs


def peft_model(path, adapter):
    base = transformers.DeepseekVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter, is_trainable=True).eval()


def test_peft_loads_the_exported_adapter_with_the_same_logits(case):
    path, model, config, params, adapter, inputs = case
    ref = peft_model(path, adapter)
    names = [n for n, _ in ref.named_parameters() if "lora_A" in n]
    assert len(names) == 2 * 7 + 2 * 2  # every adapted module, both layers of both stacks
    x = {k: v for k, v in inputs.items() if k != "labels"}
    want = F.torch_logits(ref, x)
    batch = {k: jnp.asarray(v) for k, v in x.items()}
    got = np.asarray(jax.jit(lambda p: ST.logits(DeepseekVL(model.config), p, batch, config))(params))
    base = F.torch_logits(transformers.DeepseekVLForConditionalGeneration.from_pretrained(path).eval(), x)
    assert F.max_rel_err(want, base) > 0.05  # adapters and aligner matter
    assert F.max_rel_err(got, want, x["attention_mask"]) <= 1e-5


def test_adapter_gradients_equal_torch_autograd(case):
    path, model, config, params, adapter, inputs = case
    ref = peft_model(path, adapter)
    out = ref(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    out.loss.backward()
    want = {n.replace(".default", ""): p.grad.numpy() for n, p in ref.named_parameters()
            if "lora_" in n and p.grad is not None}
    batch = {k: jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32) for k, v in inputs.items()}
    module = DeepseekVL(model.config)
    frozen = {k: v for k, v in params.items() if k != "lora"}
    loss, grads = jax.jit(jax.value_and_grad(
        lambda a: ST.mean_loss(module, {**frozen, "lora": a}, batch, config)))(params["lora"])
    assert abs(float(loss) - float(out.loss)) <= 1e-5 * float(out.loss)
    got = peft_io.adapter_tensors({"lora": jax.device_get(grads)})
    assert set(got) == set(want) and len(got) == 36
    for k, g in got.items():
        scale = np.abs(want[k]).max()
        assert scale > 0 and np.abs(g - want[k]).max() <= 1e-4 * scale, (k, np.abs(g - want[k]).max() / scale)


def test_adapter_written_by_peft_loads(case, tmp_path):
    path, model, config, params, _, inputs = case
    base = transformers.DeepseekVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    pc = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_rslora=True,
                         init_lora_weights=False)  # random B: a non-trivial adapter; q_proj in SigLIP too
    ref = peft.get_peft_model(base, pc).eval()
    ref.save_pretrained(tmp_path)
    x = {k: v for k, v in inputs.items() if k != "labels"}
    want = F.torch_logits(ref, x)
    got = np.asarray(load_pretrained(path, progress=False, adapter=tmp_path)(**x))
    assert F.max_rel_err(got, np.asarray(model(**x))) > 1e-3  # the adapter changed the model
    assert F.max_rel_err(got, want, x["attention_mask"]) <= 1e-5
    with pytest.raises(peft_io.AdapterError, match="no adapter_config.json"):
        load_pretrained(path, progress=False, adapter=tmp_path / "nowhere")


def test_generate_with_a_missing_adapter_says_so_in_one_line(tmp_path, capsys):
    from deepseek_vl_jax.cli import main

    import test_training_helpers as H

    model_dir = H.model_dir()
    capsys.readouterr()  # whatever building the model directory printed
    assert main(["generate", "--model", model_dir, "--adapter", str(tmp_path / "none"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no adapter_config.json" in err and "\n" not in err

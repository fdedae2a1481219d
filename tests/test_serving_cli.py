"""`deepseek-vl-jax serve` argument errors: one line, exit status 2, nothing loaded or bound."""

from deepseek_vl_jax import cli


def test_serve_argument_errors(serving_models, tmp_path, capsys):
    path, _, _ = serving_models("vl")
    capsys.readouterr()  # the fixture's own output
    for argv, message in (
            (["--model", str(tmp_path)], "is not a model directory"),
            (["--model", path, "--mesh", "pipeline=2"], "expected NAME=SIZE"),
            (["--model", path, "--mesh", "tensor=3"], "--mesh 'tensor=3'"),
            (["--model", path, "--max-batch", "0"], "--max-batch must be >= 1"),
            (["--model", path, "--prefill-budget", "0"], "--prefill-budget must be >= 1"),
            (["--model", path, "--decode-steps", "0"], "--decode-steps must be >= 1"),
            (["--model", path, "--allowed-media-dir", str(tmp_path / "nope")], "is not a directory")):
        assert cli.main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_serve_with_an_adapter_and_int8_answers_as_generate(serving_models, tmp_path):
    """`serve --adapter DIR --quantize int8`: the engine built from the command line answers as `generate` on
    `load_pretrained(DIR, adapter=..., quantize="int8")` (greedy tokens), and differs from the plain model."""
    import argparse

    import numpy as np
    import peft
    import torch
    import transformers

    from deepseek_vl_jax import generate, load_pretrained
    from deepseek_vl_jax.serving import Options, Prompt
    from deepseek_vl_jax.serving import cli as serve_cli

    import serving_fixtures as S

    path, plain, proc = serving_models("vl")
    base = transformers.DeepseekVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    pc = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                         init_lora_weights=False)  # random B: an adapter that changes the answers
    peft.get_peft_model(base, pc).save_pretrained(tmp_path / "adapter")

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(["--model", path, "--adapter", str(tmp_path / "adapter"), "--quantize", "int8",
                              "--max-batch", "2", "--max-seq-len", "128", "--prefill-chunk", "16"])
    engine, _ = serve_cli.build(args)
    from deepseek_vl_jax.quantization import QTensor
    import jax

    leaves = jax.tree.leaves(engine.params, is_leaf=lambda x: isinstance(x, QTensor))
    assert sum(isinstance(x, QTensor) for x in leaves) >= 7  # the decoder's linear layers are int8 in the engine
    chat = [{"role": "user", "content": [{"type": "image", "image": S.pil_image(1)},
                                         {"type": "text", "text": "Describe the picture."}]}]
    batch = proc(chat, add_generation_prompt=True)
    engine.start()
    try:
        got = engine.generate(Prompt.from_batch(batch), Options(max_tokens=8, temperature=0.0))[0]["tokens"]
    finally:
        engine.stop()
    model = load_pretrained(path, progress=False, adapter=tmp_path / "adapter", quantize="int8")
    want = np.asarray(generate(model, batch, max_new_tokens=8, eos_token_id=proc.eos_token_id))[0]
    ends = np.flatnonzero(want == proc.eos_token_id)
    want = want[:ends[0] + 1] if len(ends) else want
    assert list(got) == [int(t) for t in want]
    other = np.asarray(generate(plain, batch, max_new_tokens=8, eos_token_id=proc.eos_token_id))[0]
    assert [int(t) for t in other[:len(want)]] != list(got)  # the adapter (and int8) really are in use

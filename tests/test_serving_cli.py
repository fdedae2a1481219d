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
            (["--model", path, "--allowed-media-dir", str(tmp_path / "nope")], "is not a directory")):
        assert cli.main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err

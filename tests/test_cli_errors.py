"""Every subcommand's bad inputs, table-driven and in-process (`cli.main(argv)`): the exit status (2 for the user's
mistakes, 3 for a full or read-only disk), one `error:` line on stderr naming the problem, no traceback, and nothing
half-written at the destination. A few cases run as real processes (`python -m deepseek_vl_jax`)."""

import contextlib
import json
import os
import subprocess
import sys

import pytest

from deepseek_vl_jax import cli, cli_errors

import processing_fixtures as PF

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "models", "deepseek-vl-tiny")  # the shipped model
IMAGE = os.path.join(REPO, "examples", "shapes.png")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the cases point at: a non-image, an empty / bad JSONL, a file where a directory is expected, an
    existing destination, a fake training output with steps 2 and 4, configs for `init`."""
    d = tmp_path_factory.mktemp("cli_inputs")
    (d / "bad.png").write_text("not an image")
    (d / "empty.jsonl").write_text("")
    (d / "bad.jsonl").write_text("{broken\n[1, 2]\n")
    (d / "a_file").write_text("x")
    (d / "exists").mkdir()
    (d / "exists" / "keep.txt").write_text("keep")
    (d / "nonempty").mkdir()
    (d / "nonempty" / "old.png").write_text("old")
    for step in (2, 4):
        os.makedirs(d / "run" / "checkpoints" / str(step) / "params")
    with open(os.path.join(TINY, "config.json")) as f:
        config = json.load(f)
    small = json.loads(json.dumps(config))
    small["text_config"]["vocab_size"] = 100
    (d / "small_vocab.json").write_text(json.dumps(small))
    (d / "config.json").write_text(json.dumps(config))
    (d / "not_json.json").write_text("{")
    (d / "data.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]}) + "\n")
    return d


G = ["generate", "--model", TINY, "--prompt", "What color is the circle?"]
T = ["train", "--model", TINY, "--distributed", "off", "--set", "logging.progress=false"]

# (name, argv with {d} for the inputs directory, exit status, words the message must contain, path that must stay
#  absent (or unchanged, for "exists"))
CASES = [
    ("unknown command", ["frobnicate"], 2, ["unknown command 'frobnicate'", "generate"], None),
    ("missing flag", ["generate", "--model", TINY], 2, ["--prompt", "required"], None),
    ("bad flag value", G + ["--top-k", "many"], 2, ["--top-k", "invalid int"], None),
    ("no model dir", ["generate", "--model", "{d}/nope", "--prompt", "hi"], 2, ["nope", "does not exist"], None),
    ("model dir without config", ["chat", "--model", "{d}/exists"], 2, ["no config.json"], None),
    ("negative temperature", G + ["--temperature", "-1"], 2, ["--temperature=-1.0", "> 0", "0: greedy"], None),
    ("nan temperature", G + ["--temperature", "nan"], 2, ["--temperature=nan", "finite"], None),
    ("top-p above 1", G + ["--top-p", "1.5"], 2, ["--top-p=1.5", "(0, 1]"], None),
    ("negative top-k", G + ["--top-k", "-3"], 2, ["--top-k=-3", ">= 0"], None),
    ("zero repetition penalty", G + ["--repetition-penalty", "0"], 2, ["--repetition-penalty=0.0", "> 0"], None),
    ("zero max-new-tokens", G + ["--max-new-tokens", "0"], 2, ["--max-new-tokens=0", ">= 1"], None),
    ("max-new-tokens past the positions", G + ["--image", IMAGE, "--max-new-tokens", "300"], 2,
     ["--max-new-tokens 300", "max_position_embeddings=256", "--max-new-tokens 189 or less"], None),
    ("missing image", G + ["--image", "{d}/missing.png"], 2, ["missing.png", "no such file"], None),
    ("not an image", G + ["--image", "{d}/bad.png"], 2, ["bad.png", "cannot read image"], None),
    ("convert: no source", ["convert", "{d}/nope", "{d}/out", "--no-progress"], 2, ["nope", "no such directory"],
     "{d}/out"),
    ("convert: destination exists", ["convert", TINY, "{d}/exists", "--no-progress"], 2,
     ["exists", "already exists", "--force"], "exists"),
    ("export: not a checkpoint", ["export", TINY, "{d}/out", "--no-progress"], 2,
     ["neither a Flax checkpoint", "training output"], "{d}/out"),
    ("export: rotated-out step", ["export", "{d}/run", "{d}/out", "--step", "1", "--no-progress"], 2,
     ["asked for step 1", "the steps there are [2, 4]"], "{d}/out"),
    ("init: missing config", ["init", "{d}/new", "--config", "{d}/nope.json", "--processor", TINY], 2,
     ["nope.json", "no such file"], "{d}/new"),
    ("init: config not JSON", ["init", "{d}/new", "--config", "{d}/not_json.json", "--processor", TINY], 2,
     ["not_json.json", "not valid JSON"], "{d}/new"),
    ("init: destination exists", ["init", "{d}/exists", "--config", "{d}/config.json", "--processor", TINY], 2,
     ["exists", "already exists", "--force"], "exists"),
    ("init: vocabulary too small", ["init", "{d}/new", "--config", "{d}/small_vocab.json", "--processor", TINY], 2,
     ["vocab_size 100", "at least"], "{d}/new"),
    ("train: missing data", T + ["--data", "{d}/nope.jsonl", "--output", "{d}/out"], 2, ["--data", "nope.jsonl"],
     "{d}/out"),
    ("train: missing model", ["train", "--model", "{d}/nope", "--data", "{d}/data.jsonl", "--output", "{d}/out",
                              "--distributed", "off"], 2, ["--model", "not a model directory"], "{d}/out"),
    ("train: output is a file", T + ["--data", "{d}/data.jsonl", "--output", "{d}/a_file"], 2,
     ["--output", "is a file"], None),
    ("train: negative learning rate", T + ["--data", "{d}/data.jsonl", "--output", "{d}/out", "--learning-rate=-1"],
     2, ["--learning-rate -1.0", "(0, 1]"], "{d}/out"),
    ("train: nan learning rate", T + ["--data", "{d}/data.jsonl", "--output", "{d}/out", "--learning-rate", "nan"],
     2, ["--learning-rate nan", "finite"], "{d}/out"),
    ("train: learning rate in a config", T + ["--data", "{d}/data.jsonl", "--output", "{d}/out", "--set",
                                              "optimizer.learning_rate=-0.5"], 2,
     ["optimizer.learning_rate", "(0, 1]", "-0.5"], "{d}/out"),
    ("train: mesh does not divide", T + ["--data", "{d}/data.jsonl", "--output", "{d}/out", "--set", "mesh.data=3",
                                         "--set", "mesh.fsdp=1"], 2, ["mesh", "devices", "mesh.fsdp=-1"], "{d}/out"),
    ("train: unknown config key", T + ["--data", "{d}/data.jsonl", "--output", "{d}/out", "--set", "stpes=3"], 2,
     ["stpes", "valid keys"], "{d}/out"),
    ("evaluate: missing file", ["evaluate", "--model", TINY, "--data", "{d}/nope.jsonl"], 2,
     ["--data", "nope.jsonl", "no such file"], None),
    ("evaluate: empty file", ["evaluate", "--model", TINY, "--data", "{d}/empty.jsonl"], 2,
     ["empty.jsonl", "no usable rows"], None),
    ("evaluate: only bad rows", ["evaluate", "--model", TINY, "--data", "{d}/bad.jsonl"], 2,
     ["bad.jsonl", "no usable rows"], None),
    ("evaluate: no model", ["evaluate", "--model", "{d}/nope", "--data", "{d}/data.jsonl"], 2,
     ["--model", "not a model directory"], None),
    ("synthetic: non-empty directory", ["synthetic", "{d}/nonempty", "--train", "2", "--heldout", "1"], 2,
     ["nonempty", "not empty", "--force"], None),
    ("synthetic: output is a file", ["synthetic", "{d}/a_file", "--train", "2"], 2, ["a_file", "is a file"], None),
    ("synthetic: no pictures", ["synthetic", "{d}/new", "--train", "0"], 2, ["--train", ">= 1"], "{d}/new"),
    ("verify: no such checkpoint", ["verify", "{d}/nope", TINY], 2, ["nope"], None),
]


def _fill(items, d):
    return [str(x).replace("{d}", str(d)) for x in items]


@pytest.mark.parametrize("name,argv,status,words,absent", CASES, ids=[c[0] for c in CASES])
def test_bad_input(files, capsys, name, argv, status, words, absent):
    before = sorted(os.listdir(files / "exists"))
    rc = cli.main(_fill(argv, files))
    err = capsys.readouterr().err
    assert rc == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w.replace("{d}", str(files)) in errors[0], errors[0]
    if absent == "exists":
        assert sorted(os.listdir(files / "exists")) == before  # the existing destination is untouched
    elif absent:
        assert not os.path.exists(_fill([absent], files)[0])
    assert not [n for n in os.listdir(files) if ".partial-" in n or ".replaced-" in n]


def test_debug_shows_the_traceback(files, monkeypatch):
    argv = ["convert", str(files / "nope"), str(files / "out"), "--no-progress"]
    with pytest.raises(FileNotFoundError):
        cli.main(argv + ["--debug"])
    monkeypatch.setenv(cli_errors.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        cli.main(argv)


@contextlib.contextmanager
def mounted(path, options):
    """A small tmpfs at `path` (root only); skips the test where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.parametrize("options,words", [("ro,size=1m", ["Read-only file system", "write elsewhere"]),
                                           ("size=300k", ["No space left on device", "free some disk space"])])
def test_full_or_read_only_disk_is_an_environment_error(tmp_path, capsys, options, words):
    """convert (6.6 MB of weights) onto a read-only or a 300 KB file system: exit 3, one line, nothing left."""
    with mounted(tmp_path / "mnt", options) as mnt:
        rc = cli.main(["convert", TINY, str(mnt / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == cli_errors.ENV_ERROR, err
        (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
        assert "Traceback" not in err and all(w in line for w in words), err
        assert os.listdir(mnt) == []


def test_export_and_synthetic_force_leave_no_stale_files(files, tmp_path, capsys):
    """--force replaces a file or a directory whole: no `.replaced-…` sibling, no pictures of the earlier run."""
    target = tmp_path / "data"
    target.mkdir()
    (target / "stale.png").write_text("old")
    assert cli.main(["synthetic", str(target), "--train", "2", "--heldout", "1", "--force"]) == 0
    assert not (target / "stale.png").exists() and (target / "train.jsonl").is_file()
    dst = tmp_path / "flax"
    dst.write_text("a file in the way")
    assert cli.main(["convert", TINY, str(dst), "--no-progress", "--force"]) == 0
    assert dst.is_dir() and sorted(os.listdir(tmp_path)) == ["data", "flax"]
    capsys.readouterr()


def run_module(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "deepseek_vl_jax", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, **(env or {})})


def test_python_dash_m_is_the_cli(files):
    ok = run_module("--help")
    assert ok.returncode == 0 and "generate" in ok.stdout and "train" in ok.stdout
    bad = run_module("generate", "--model", TINY, "--prompt", "hi", "--temperature", "-1")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --temperature=-1.0") and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1
    helped = run_module("generate", "--help")
    assert helped.returncode == 0
    for flag in ("--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--dtype"):
        assert flag in helped.stdout
    assert "(default: 0.0)" in helped.stdout and "(0, 1]" in helped.stdout


def test_evaluate_skips_and_reports_bad_rows_by_line(tmp_path, capsys):
    """As `train` does: a bad JSON line is left out and named by its line; the good rows are scored."""
    import shutil

    shutil.copy(IMAGE, tmp_path / "shapes.png")  # image paths are relative to the data file
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "shapes.png"},
                                                     {"type": "text", "text": "What color is the circle?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "kind": "color"}
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps(row) + "\n{not json\n" + json.dumps(row) + "\n")
    predictions = tmp_path / "pred.jsonl"
    rc = cli.main(["evaluate", "--model", TINY, "--data", str(data), "--max-new-tokens", "4",
                   "--predictions", str(predictions)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"skipped 1 bad row(s) of {data}: lines [2]" in out.err and "Traceback" not in out.err
    summary = json.loads(out.out)
    assert summary["rows"] == 2 and summary["skipped_rows"] == [2] and summary["by_kind"]["color"][1] == 2
    assert [json.loads(x)["line"] for x in predictions.read_text().splitlines()] == [1, 3]

"""Execute every notebook in notebooks/ (a fresh kernel each, on this interpreter) and check what it printed.

The notebooks are executed in memory from their saved copies; nothing is written to notebooks/ (each notebook keeps
its own scratch files in a temporary directory). To re-execute them and save the outputs (after the demo model or
the library changed), run from the repository root:

    python tests/test_notebooks.py [notebooks/NAME.ipynb ...]
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ipykernel  # noqa: F401  (the kernel the notebooks run in; a test extra)
import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "deepseek-vl-jax-notebook-tests"
CELL_TIMEOUT = 300  # seconds per cell
PROBE = "import sys; print('KERNEL_PYTHON=' + sys.executable)"
# ipykernel, after the torchvision import fix the test session applies too (tests/torchvision_ops.py)
KERNEL_MAIN = ("import runpy, torchvision_ops; torchvision_ops.ensure_importable(); "
               "runpy.run_module('ipykernel_launcher', run_name='__main__', alter_sys=True)")


def _kernel_setup(scratch: Path) -> dict[str, str]:
    """A kernel spec that runs ipykernel on *this* interpreter (the default `python3` spec may resolve to another
    Python), found through JUPYTER_PATH, and the kernel's environment: this process's, without the test session's
    XLA_FLAGS (conftest simulates 8 devices; each notebook chooses its own devices, as it does when run by hand)."""
    spec_dir = scratch / "share" / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-c", KERNEL_MAIN, "-f", "{connection_file}"],
        "display_name": "Python 3 (deepseek-vl-jax tests)", "language": "python",
        "metadata": {"debugger": False}}))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JUPYTER_PATH"] = os.pathsep.join([str(scratch / "share" / "jupyter"), *filter(None, [
        os.environ.get("JUPYTER_PATH")])])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def run(nb, kernel_env: dict[str, str], timeout: int = CELL_TIMEOUT):
    """Execute `nb` in place (in memory) with cwd = notebooks/; raises `CellExecutionError` on the first error."""
    client = nbclient.NotebookClient(nb, timeout=timeout, startup_timeout=120, kernel_name=KERNEL_NAME,
                                     allow_errors=False, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = kernel_env["JUPYTER_PATH"]  # the kernel spec is looked up in this process
    try:
        client.execute(env=kernel_env)
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = saved
    return nb


def execute(path: Path, kernel_env: dict[str, str]):
    """The notebook at `path`, executed (the file itself is not touched)."""
    return run(nbformat.read(path, as_version=4), kernel_env)


def stream_text(nb) -> str:
    """Everything the code cells printed (stdout, and the markdown or plain text of displayed results)."""
    parts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stdout":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                data = out.get("data", {})
                parts.append(data.get("text/markdown") or data.get("text/plain", ""))
    return "\n".join(parts)


def count_images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def errors(nb) -> list[str]:
    return [f"{out.ename}: {out.evalue}" for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.output_type == "error"]


def floats_after(label: str, text: str) -> list[float]:
    return [float(x) for x in re.findall(re.escape(label) + r"\s*([-+0-9.eE]+|nan|inf)", text)]


# --- per-notebook checks on what the executed notebook printed --------------------------------------------------

def check_inference(text: str, nb) -> None:
    answers = re.findall(r"^Q: (.+?)\s+->\s+A: (.*)$", text, flags=re.M)
    assert len(answers) >= 12, text
    assert any(q.startswith("What color is the circle?") for q, _ in answers)
    assert count_images(nb) >= 2
    assert re.search(r"^correct: \d+ of \d+", text, flags=re.M), text


def check_conversion(text: str, nb) -> None:
    assert "bit-identical: True" in text, text
    assert "transformers reloads the export: True" in text, text
    assert "all modules within the thresholds" in text, text
    assert "verify exit status: 0" in text, text
    rel = floats_after("max rel error vs transformers:", text)
    assert len(rel) >= 2 and max(rel) <= 1e-5, text


def check_finetuning(text: str, nb) -> None:
    (first,), (last,) = floats_after("first loss:", text), floats_after("last loss:", text)
    assert last < first, text
    assert "loss went down: True" in text, text
    assert count_images(nb) >= 1


def check_sharding(text: str, nb) -> None:
    assert "devices: 8" in text, text
    # float32 rounding of re-ordered sums, proportional to the logits' scale: compared relative to max |logit|
    diffs = floats_after("max |logits - single-device logits| =", text)
    rel = re.findall(r"relative to the largest \|logit\| \([0-9.]+\): ([-+0-9.eE]+)", text)
    assert len(diffs) == 2 and len(rel) == 2 and max(map(float, rel)) <= 1e-5, text
    assert "same answers as on one device: True" in text, text
    for axis in ("fsdp", "tensor"):  # some parameter sharded over each axis (repr: P(...) or PartitionSpec(...))
        assert re.search(r"(?:P|PartitionSpec)\(.*'%s'" % axis, text), text


CHECKS = {"01_inference": check_inference, "02_conversion_parity": check_conversion,
          "03_finetuning": check_finetuning, "04_sharding": check_sharding}


@pytest.fixture(scope="module")
def kernel_env():
    with tempfile.TemporaryDirectory(prefix="dvl-nbtest-") as scratch:
        yield _kernel_setup(Path(scratch))


def test_all_notebooks_are_checked():
    assert {p.stem for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(path: Path, kernel_env):
    nb = execute(path, kernel_env)
    assert not errors(nb)
    text = stream_text(nb)
    CHECKS[path.stem](text, nb)


def test_kernel_runs_this_interpreter(kernel_env):
    nb = run(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(PROBE)]), kernel_env, timeout=60)
    assert f"KERNEL_PYTHON={sys.executable}" in stream_text(nb)


def coalesce_streams(nb) -> None:
    """Merge consecutive stdout/stderr outputs of a cell (streamed text arrives in pieces), as Jupyter displays them."""
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        if cell.cell_type == "code":
            cell.outputs = merged


def main(argv: list[str]) -> int:
    """Re-execute notebooks (all, or the paths given) and save them with their outputs."""
    paths = [Path(p).resolve() for p in argv] or NOTEBOOKS
    with tempfile.TemporaryDirectory(prefix="dvl-nbrun-") as scratch:
        env = _kernel_setup(Path(scratch))
        for path in paths:
            t = time.perf_counter()
            nb = execute(path, env)
            nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                         "language": "python"}
            CHECKS[path.stem](stream_text(nb), nb)
            coalesce_streams(nb)
            for cell in nb.cells:
                cell.metadata.pop("execution", None)  # timestamps: noise in diffs
            nbformat.write(nb, path)
            print(f"{path.relative_to(ROOT)}: executed and saved in {time.perf_counter() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

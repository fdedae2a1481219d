"""Make torchvision's pure-Python parts importable beside a CPU-only torch build (test-only).

timm (a dependency of the original-code reference in `original_reference/`) requires torchvision, so pip installs
it with the test extra: `torchvision==0.28.0`, the release paired with `torch==2.13.0`. PyPI's torchvision wheel is
built against CUDA torch; beside the CPU torch build its compiled ops (`_C.so`, linked to libtorch_cuda) fail to
load, and torchvision then fails at import while registering fake kernels for two of those ops
(`torchvision/_meta_registrations.py`: `torch.library.register_fake("torchvision::nms")` and `"::qnms"` need the
operator to exist). Everything else then fails with it: transformers imports torchvision as soon as it is
installed (`transformers.image_utils`, the DeepSeek-VL model classes).

`ensure_importable()` tries to load torchvision's compiled ops exactly as torchvision does; only if that fails does
it declare the schemas of those two operators (the signatures torchvision's own C++ registers), without kernels:
`torchvision.ops.nms` would raise if called, and neither the reference nor transformers' DeepSeek-VL calls it.
Everything the reference uses (transforms on tensors and PIL images) is torchvision's real Python code. With a
CUDA torch build the ops load and nothing is declared. Call it before anything imports torchvision (tests/conftest.py
does; so does the kernel of tests/test_notebooks.py)."""

from __future__ import annotations

import importlib.util
import os

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # keeps the declared schemas alive for the whole process


def ensure_importable() -> str:
    """'absent' (torchvision not installed), 'native' (its ops load) or 'declared' (schemas declared here)."""
    global _library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return "absent"
    import torch

    if _library is not None or hasattr(torch.ops.torchvision, "nms"):
        return "declared" if _library is not None else "native"
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
        return "native"
    except (OSError, ImportError):
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _library.define(schema)
        return "declared"

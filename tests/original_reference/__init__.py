"""An independent reference for the original deepseek-ai DeepSeek-VL code and checkpoint layout (test-only).

`models`: the original modules as deepseek-ai/DeepSeek-VL builds them (timm, segment_anything, torchvision,
transformers' Llama); `processing`: its image processor, conversation format and chat processor; `checkpoints`:
reduced-size look-alikes of the published directories, saved from the reference's own state_dict.
Needs the test extra (timm, segment-anything, torchvision; see tests/torchvision_ops.py)."""

import importlib.util as _util

_missing = [m for m in ("torchvision", "timm", "segment_anything") if _util.find_spec(m) is None]
if _missing:
    raise ModuleNotFoundError(f"tests/original_reference needs {', '.join(_missing)} from the test extra: "
                              f"pip install -e '.[test]' (torchvision==0.28.0, timm==1.0.31, segment-anything==1.0)")

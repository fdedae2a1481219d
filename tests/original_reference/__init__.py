"""An independent reference for the original deepseek-ai DeepSeek-VL code and checkpoint layout (test-only).

`models`: the original modules as deepseek-ai/DeepSeek-VL builds them (timm, segment_anything, torchvision,
transformers' Llama); `processing`: its image processor, conversation format and chat processor; `checkpoints`:
reduced-size look-alikes of the published directories, saved from the reference's own state_dict.
Needs the test extra (timm, segment-anything, torchvision; see tests/torchvision_ops.py)."""

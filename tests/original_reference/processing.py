"""The original DeepSeek-VL processing (deepseek-ai/DeepSeek-VL): `image_processing_vlm.VLMImageProcessor`,
`utils/conversation.py` (format `deepseek`) and `processing_vlm.VLChatProcessor` (prompt, tokenisation, image-token
expansion, left padding with the pad id or, without one, the end-of-sentence id). Written from the original code;
the tokenizer is transformers' AutoTokenizer on the directory, as the original loads it.

- resize: the longest side becomes `image_size`, each side `max(int(side / longest * image_size), min_size)`
  (floored, not rounded), with torchvision's functional resize on the PIL image (bicubic), then `expand2square` with
  `background_color = int(mean * 255)` per channel, rescale by 1/255, normalise only if `do_normalize` (the
  published files say false: the towers normalise).
- conversation: `system + "\\n\\n"`, then `role + ": " + message + sep` for each message with text (sep alternating
  "\\n\\n" and the end-of-sentence token), `role + ":"` for an empty one; each message stripped, the prompt stripped.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from transformers import AutoTokenizer

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. "
                 "You are able to understand the visual content that the user provides, "
                 "and assist the user with a variety of tasks using natural language.")
EOS = "<｜end▁of▁sentence｜>"


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


class VLMImageProcessor:
    def __init__(self, image_size: int, min_size: int = 14, image_mean=(0.48145466, 0.4578275, 0.40821073),
                 image_std=(0.26862954, 0.26130258, 0.27577711), rescale_factor: float = 1.0 / 255.0,
                 do_normalize: bool = True, **ignored):
        self.image_size, self.min_size = image_size, min_size
        self.image_mean, self.image_std = image_mean, image_std
        self.rescale_factor, self.do_normalize = rescale_factor, do_normalize
        # set after the saved `background_color` attribute, as the original __init__ does
        self.background_color = (127, 127, 127) if image_mean is None else tuple(int(x * 255) for x in image_mean)

    def resize(self, pil_img: Image.Image) -> np.ndarray:
        width, height = pil_img.size
        longest = max(width, height)
        size = [max(int(height / longest * self.image_size), self.min_size),
                max(int(width / longest * self.image_size), self.min_size)]
        pil_img = TF.resize(pil_img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        pil_img = expand2square(pil_img, self.background_color)
        return np.transpose(np.asarray(pil_img), (2, 0, 1))

    def __call__(self, images) -> torch.Tensor:
        out = []
        for image in images:
            x = (self.resize(image).astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.do_normalize:
                mean = np.asarray(self.image_mean, np.float32)[:, None, None]
                std = np.asarray(self.image_std, np.float32)[:, None, None]
                x = ((x - mean) / std).astype(np.float32)
            out.append(torch.from_numpy(x))
        return torch.stack(out) if out else torch.zeros((0, 3, self.image_size, self.image_size))

    @property
    def default_shape(self):
        return [3, self.image_size, self.image_size]


def deepseek_prompt(conversation: list[dict], system_prompt: str = SYSTEM_PROMPT) -> str:
    """`apply_sft_template_for_multi_turn_prompts` with the `deepseek` conversation template."""
    seps = ["\n\n", EOS]
    ret = system_prompt + seps[0] if system_prompt else ""
    for i, message in enumerate(conversation):
        text = message["content"].strip()
        ret += f"{message['role']}: {text}{seps[i % 2]}" if text else f"{message['role']}:"
    return ret.strip()


class VLChatProcessor:
    """`processing_vlm.VLChatProcessor` loaded from an original checkpoint directory."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, "preprocessor_config.json")) as f:
            self.image_processor = VLMImageProcessor(**json.load(f))
        with open(os.path.join(directory, "processor_config.json")) as f:
            cfg = json.load(f)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.image_tag = cfg.get("image_tag", "<image_placeholder>")
        self.num_image_tokens = cfg.get("num_image_tokens", 576)
        self.image_id = self.tokenizer.convert_tokens_to_ids(self.image_tag)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def process_one(self, conversation: list[dict], images: list[Image.Image]) -> dict:
        sft_format = deepseek_prompt(conversation)
        ids = torch.LongTensor(self.tokenizer.encode(sft_format))
        pieces, start = [], 0
        for index in (ids == self.image_id).nonzero().flatten().tolist():
            pieces += [ids[start:index], torch.full((self.num_image_tokens,), self.image_id, dtype=torch.long)]
            start = index + 1
        pieces.append(ids[start:])
        return {"sft_format": sft_format, "input_ids": torch.cat(pieces), "pixel_values": self.image_processor(images),
                "num_images": len(images)}

    def __call__(self, conversations: list[list[dict]], images: list[list[Image.Image]]) -> dict:
        """`process_one` for each conversation, then `batchify` (left padding)."""
        prepared = [self.process_one(c, i) for c, i in zip(conversations, images)]
        longest = max(len(p["input_ids"]) for p in prepared)
        n_max = max(1, max(p["num_images"] for p in prepared))
        b = len(prepared)
        out = {"input_ids": torch.full((b, longest), self.pad_id).long(),
               "attention_mask": torch.zeros((b, longest)).long(),
               "pixel_values": torch.zeros((b, n_max, *self.image_processor.default_shape)).float(),
               "images_seq_mask": torch.zeros((b, longest)).bool(),
               "images_emb_mask": torch.zeros((b, n_max, self.num_image_tokens)).bool(),
               "sft_format": [p["sft_format"] for p in prepared]}
        for i, p in enumerate(prepared):
            n = len(p["input_ids"])
            out["attention_mask"][i, -n:] = 1
            out["input_ids"][i, -n:] = p["input_ids"]
            out["images_seq_mask"][i, -n:] = p["input_ids"] == self.image_id
            if p["num_images"]:
                out["pixel_values"][i, :p["num_images"]] = p["pixel_values"]
                out["images_emb_mask"][i, :p["num_images"]] = True
        return out

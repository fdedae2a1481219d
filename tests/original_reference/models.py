"""The original DeepSeek-VL model as deepseek-ai/DeepSeek-VL builds it (`deepseek_vl/models/`), from the libraries
the original code is made of: timm's `VisionTransformer` (SigLIP), segment_anything's `ImageEncoderViT` (SAM-B),
torchvision's `Normalize` / `Resize`, transformers' `LlamaForCausalLM`. Written from the original code, not from
this project's tables: module names (hence state_dict keys) are the original's by construction.

- `siglip_vit.py` `create_siglip_vit`: timm ViT, class_token=False, global_pool="map" (the attention-pooling head is
  built, its weights are in the published files) but `ignore_head=True`: the tower returns `forward_features`
  (the final norm included); LayerNorm eps 1e-6, exact GELU; `select_layer` truncates the depth.
- `sam.py` `ImageEncoderViT` (sam_hd=True): segment_anything's encoder plus DeepSeek's `downsamples` (two stride-2
  3x3 convs, no bias), `neck_hd` (a deep copy of the neck) and `hd_alpha_downsamples`; features of the first
  global-attention block go through `neck_hd`, are resized and projected by the SAME `downsamples`, scaled by alpha
  and added. The original resizes to a hard-coded 96 x 96 (= 4 x its 24 x 24 SigLIP grid); `resize_to` keeps that
  rule at reduced sizes (4 x the SigLIP grid).
- `clip_encoder.py`: `CLIPVisionTower` normalises pixels itself (torchvision Normalize with the config's
  `pixel_mean` / `pixel_std`); `HybridVisionTower` feeds the high-res tower the 1024-px image and the low-res tower
  `torchvision.transforms.Resize(384, antialias=True)` of the same (un-normalised) tensor, and builds two
  LayerNorms (`high_layer_norm`, `low_layer_norm`) that its forward never uses.
- `projector.py` `MlpProjector`: mlp_gelu (Linear, GELU, Linear) and low_high_hybrid_split_mlp_gelu.
- `modeling_vlm.py` `MultiModalityCausalLM.prepare_inputs_embeds`.

Size fields in a tower's params (`width`, `layers`, `heads`, `patch_size`, `mlp_ratio`, `window_size`,
`global_attn_indexes`, `prompt_embed_dim`, `downsample_channels`) override the named model's sizes: the reduced-size
test fixtures need them (the original code would ignore them and build the full-size tower).
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms
from segment_anything.modeling.image_encoder import ImageEncoderViT
from timm.models.vision_transformer import VisionTransformer
from transformers import LlamaConfig, LlamaForCausalLM

# siglip_vit.py SigLIP_MODEL_CONFIG and sam.py SAM_MODEL_CONFIG (the entries the published checkpoints name)
SIGLIP_MODEL_CONFIG = {"siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24,
                                                        heads=16, mlp_ratio=4)}
SAM_MODEL_CONFIG = {"sam_b_downsample": dict(width=768, layers=12, heads=12, global_attn_indexes=[2, 5, 8, 11],
                                             downsample_channels=(512, 1024))}
SAM_DEFAULTS = dict(patch_size=16, window_size=14, prompt_embed_dim=256)  # SAMViTCfg / create_sam_vit
SIZE_FIELDS = ("width", "layers", "heads", "patch_size", "mlp_ratio", "window_size", "global_attn_indexes",
               "prompt_embed_dim", "downsample_channels")


def _sizes(params: dict, table: dict, defaults: dict | None = None) -> dict:
    return {**(defaults or {}), **table.get(params.get("model_name"), {}),
            **{k: params[k] for k in SIZE_FIELDS if k in params}}


def create_siglip_vit(image_size: int, select_layer: int = -1, **params) -> VisionTransformer:
    c = _sizes(params, SIGLIP_MODEL_CONFIG)
    layers = min(c["layers"], c["layers"] + select_layer + 1) if select_layer <= 0 else min(c["layers"], select_layer)
    return VisionTransformer(img_size=image_size, patch_size=c["patch_size"], embed_dim=c["width"], depth=layers,
                             num_heads=c["heads"], mlp_ratio=c["mlp_ratio"], class_token=False, global_pool="map",
                             num_classes=0, weight_init="skip", norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             act_layer=nn.GELU)


class SamHD(ImageEncoderViT):
    """segment_anything's SAM encoder with DeepSeek's high-resolution additions (sam.py, sam_hd=True)."""

    def __init__(self, downsample_channels, resize_to: int, **kwargs):
        super().__init__(**kwargs)
        layers, channels = [], kwargs["out_chans"]
        for out in downsample_channels:
            layers.append(nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1, bias=False))
            channels = out
        self.downsamples = nn.Sequential(*layers)
        self.hd_alpha_downsamples = nn.Parameter(torch.zeros(1))
        self.neck_hd = copy.deepcopy(self.neck)
        self.resize_to = resize_to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        global_features = []
        for blk in self.blocks:
            x = blk(x)
            if blk.window_size == 0:
                global_features.append(x)
        size = (self.resize_to, self.resize_to)
        x = self.neck(x.permute(0, 3, 1, 2))
        x = self.downsamples(F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype))
        first = self.neck_hd(global_features[0].permute(0, 3, 1, 2))
        first = F.interpolate(first.float(), size=size, mode="bilinear", align_corners=False)
        first = self.downsamples(first.to(x.dtype))
        return x + first * self.hd_alpha_downsamples


def create_sam_vit(image_size: int, resize_to: int = 96, **params) -> SamHD:
    c = _sizes(params, SAM_MODEL_CONFIG, SAM_DEFAULTS)
    return SamHD(depth=c["layers"], embed_dim=c["width"], img_size=image_size, mlp_ratio=c.get("mlp_ratio", 4),
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=c["heads"], patch_size=c["patch_size"],
                 qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(c["global_attn_indexes"]),
                 window_size=c["window_size"], out_chans=c["prompt_embed_dim"],
                 downsample_channels=tuple(c["downsample_channels"]), resize_to=resize_to)


class CLIPVisionTower(nn.Module):
    def __init__(self, model_name: str, image_size: int, select_layer: int = -1, pixel_mean=None, pixel_std=None,
                 resize_to: int = 96, **params):
        super().__init__()
        if model_name.startswith("siglip"):
            self.vision_tower = create_siglip_vit(image_size=image_size, select_layer=select_layer,
                                                  model_name=model_name, **params)
            self.ignore_head = True  # the tower returns forward_features
        else:
            self.vision_tower = create_sam_vit(image_size=image_size, resize_to=resize_to, model_name=model_name,
                                               **params)
            self.ignore_head = False
        self.image_norm = (torchvision.transforms.Normalize(mean=pixel_mean, std=pixel_std)
                           if pixel_mean is not None and pixel_std is not None else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_norm is not None:
            images = self.image_norm(images)
        if self.ignore_head:
            return self.vision_tower.forward_features(images)  # select_feature "same"
        return self.vision_tower(images)


class HybridVisionTower(nn.Module):
    def __init__(self, high_res_cfg: dict, low_res_cfg: dict, concat_type: str = "tuple", **ignored):
        super().__init__()
        low = dict(low_res_cfg)
        grid = low["image_size"] // _sizes(low, SIGLIP_MODEL_CONFIG)["patch_size"]
        self.vision_tower_high = CLIPVisionTower(**{"resize_to": 4 * grid, **high_res_cfg})
        self.vision_tower_low = CLIPVisionTower(**low)
        self.high_layer_norm = nn.LayerNorm(high_res_cfg.get("output_dim", 1024))  # built, never used
        self.low_layer_norm = nn.LayerNorm(low_res_cfg.get("output_dim", 1024))
        assert concat_type == "tuple"
        self.resize = torchvision.transforms.Resize(low["image_size"], antialias=True)

    def forward(self, images: torch.Tensor):
        high = self.vision_tower_high(images)  # [b, c, h, w]
        high = high.flatten(2).transpose(1, 2)  # "b c h w -> b (h w) c"
        low = self.vision_tower_low(self.resize(images))
        return high, low


class MlpProjector(nn.Module):
    def __init__(self, projector_type: str, input_dim: int, n_embed: int, depth: int = 1, **ignored):
        super().__init__()
        if projector_type == "mlp_gelu":
            modules = [nn.Linear(input_dim, n_embed)]
        elif projector_type == "low_high_hybrid_split_mlp_gelu":
            self.high_up_proj = nn.Linear(input_dim, n_embed // 2)
            self.low_up_proj = nn.Linear(input_dim, n_embed // 2)
            modules = []
        else:
            raise ValueError(f"projector_type {projector_type!r} is not rebuilt here")
        for _ in range(1, depth):
            modules += [nn.GELU(), nn.Linear(n_embed, n_embed)]
        self.layers = nn.Sequential(*modules)

    def forward(self, x):
        if isinstance(x, tuple):
            high, low = x
            x = torch.concat([self.high_up_proj(high), self.low_up_proj(low)], dim=-1)
        return self.layers(x)


class MultiModalityCausalLM(nn.Module):
    """`modeling_vlm.MultiModalityCausalLM` from an original config.json dict."""

    def __init__(self, config: dict):
        super().__init__()
        vision = config["vision_config"]
        tower = {"CLIPVisionTower": CLIPVisionTower, "HybridVisionTower": HybridVisionTower}[vision["cls"]]
        self.vision_model = tower(**vision["params"])
        self.aligner = MlpProjector(**config["aligner_config"]["params"])
        language = {k: v for k, v in config["language_config"].items() if k not in ("torch_dtype", "model_type")}
        self.language_model = LlamaForCausalLM(LlamaConfig(**language))

    def prepare_inputs_embeds(self, input_ids, pixel_values, images_seq_mask, images_emb_mask):
        """input_ids [b, T], pixel_values [b, n, 3, h, w], images_seq_mask [b, T], images_emb_mask [b, n, t]."""
        bs, n = pixel_values.shape[:2]
        images_embeds = self.aligner(self.vision_model(pixel_values.flatten(0, 1)))  # [b*n, t, D]
        images_embeds = images_embeds.reshape(bs, n * images_embeds.shape[1], -1)
        images_emb_mask = images_emb_mask.reshape(bs, -1)
        input_ids = input_ids.clone()
        input_ids[input_ids < 0] = 0
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        inputs_embeds[images_seq_mask] = images_embeds[images_emb_mask]
        return inputs_embeds

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        """[b, T, vocab] for a `processing.VLChatProcessor` batch: the prompt pass of `generate` (its positions:
        cumsum of the attention mask - 1, so left padding does not shift them)."""
        embeds = self.prepare_inputs_embeds(batch["input_ids"], batch["pixel_values"], batch["images_seq_mask"],
                                            batch["images_emb_mask"])
        mask = batch["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits

    @torch.no_grad()
    def generate(self, batch, tokenizer, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Greedy decoding as the original `inference.py` / `cli_chat.py` run it: [b, new tokens] (generate from
        inputs_embeds returns only the new tokens)."""
        embeds = self.prepare_inputs_embeds(batch["input_ids"], batch["pixel_values"], batch["images_seq_mask"],
                                            batch["images_emb_mask"])
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                            pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
                                            do_sample=False, use_cache=True, **kwargs)

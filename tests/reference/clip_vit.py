"""LAVIS's CLIP ViT-L/14 (`lavis/models/clip_vit.py`) as a PyTorch definition, from spec §2.3:
conv without bias, class + positional embedding, ln_pre, pre-LN blocks with
`nn.MultiheadAttention` (packed in_proj with bias) and a QuickGELU MLP, no ln_post; then the
BLIP-2 `ln_vision` (eps 1e-5). Positions are interpolated bicubically with align_corners=True."""
from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):  # x: (L, B, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipViT(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int):
        super().__init__()
        self.grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn(self.grid ** 2 + 1, width) * 0.1)
        self.ln_pre = nn.LayerNorm(width)
        self.resblocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_vision = nn.LayerNorm(width, eps=1e-5)

    def forward(self, x):  # x: (B, 3, H, W)
        x = self.conv1(x)
        b, d, gh, gw = x.shape
        x = x.reshape(b, d, gh * gw).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(b, 1, d), x], dim=1)
        pos = self.positional_embedding
        if (gh, gw) != (self.grid, self.grid):
            grid = pos[1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
            grid = nn.functional.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=True)
            pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, d)])
        x = self.ln_pre(x + pos)
        x = x.permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x)
        return self.ln_vision(x.permute(1, 0, 2))


def to_hf_names(sd: dict) -> dict:
    """LAVIS CLIP names -> the HF-style names our vision tree maps from."""
    out = {}
    for k, v in sd.items():
        v = v.detach().numpy()
        if k == "class_embedding":
            k, v = "embeddings.class_embedding", v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            k, v = "embeddings.position_embedding", v[None]
        elif k == "conv1.weight":
            k = "embeddings.patch_embedding.weight"
        else:
            for a, b in (("resblocks.", "encoder.layers."), ("attn.in_proj_", "self_attn.qkv."),
                         ("attn.out_proj", "self_attn.projection"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"), ("ln_pre", "pre_layernorm"),
                         ("ln_vision", "post_layernorm")):
                k = k.replace(a, b)
        out[k] = v
    return out

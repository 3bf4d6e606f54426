"""HyperFL-LPM's models (HyperFL's vit/ and resnet/, github.com/Pengxin-Guo/HyperFL a62bd10):
a frozen pretrained timm backbone with small bottleneck adapters where the official code puts
them, and a private head.

- `vit_adapter`: a timm VisionTransformer (official: vit_small_patch16_384); in every block the
  MLP branch goes through an adapter inside the residual, x + Adapter(mlp(norm2(x))), with
  Adapter(h) = h + LayerNorm(up(relu(down(h)))), bottleneck dim // 16. Head: Linear on the
  class token after the final norm. The official blocks drop the pretrained qkv biases (and
  use LayerNorm eps 1e-5); here the backbone is timm's own, biases and eps as trained.
- `resnet18_adapter`: a timm ResNet (official: resnet18, ImageNet); after each of its four
  stages an adapter BN(x + Conv1x1(BN(x))). Head: Linear(features, 128) then Linear(128,
  classes), both trained (the official code never loads its generated adapters and never
  trains its 512 -> 128 layer, see §3b: both are fixed here).

Parameter names: `net.*` without `.adapter.` is the frozen backbone, `.adapter.` the adapters
(what the hypernetwork generates), `head.*` the private head. The model always runs in eval
mode: BatchNorm statistics (backbone and adapters) stay frozen, so that clients and ranks cannot
disagree about them (the official code leaves them in train mode). No download ever: weights come
from model.pretrained=PATH, or timm's local cache, or none (random init).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError

OFFICIAL = {"vit_adapter": "vit_small_patch16_384", "resnet18_adapter": "resnet18"}
ADAPTER = ".adapter."


class Adapter(nn.Module):
    """ViT: h + LayerNorm(up(relu(down(h)))) on a block's MLP output."""

    def __init__(self, dim: int, reduction: int = 16):
        super().__init__()
        self.down_sampler = nn.Linear(dim, dim // reduction)
        self.up_sampler = nn.Linear(dim // reduction, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.norm(self.up_sampler(F.relu(self.down_sampler(h))))


class ConvAdapter(nn.Module):
    """ResNet: BN(x + Conv1x1(BN(x))) after a stage of `planes` channels."""

    def __init__(self, planes: int):
        super().__init__()
        self.conv = nn.Sequential(nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 1, bias=False))
        self.bn = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x + self.conv(x))


class Staged(nn.Module):
    """A ResNet stage followed by its adapter (names: <stage>.stage.*, <stage>.adapter.*)."""

    def __init__(self, stage: nn.Module, adapter: nn.Module):
        super().__init__()
        self.stage, self.adapter = stage, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.stage(x))


class AdaptedModel(nn.Module):
    """net (the backbone with adapters inserted) -> pooled features -> head."""

    def __init__(self, net: nn.Module, head: nn.Module, input_size: tuple[int, int, int],
                 resize: bool):
        super().__init__()
        self.net, self.head, self.input_size, self.resize = net, head, input_size, resize
        self.eval()

    def train(self, mode: bool = True) -> "AdaptedModel":
        return super().train(False)  # frozen statistics, see the module docstring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As the official transforms: grey images as 3 equal channels; ViT inputs resized to
        the backbone's size (bilinear), ResNet ones kept at their size (32x32, 28x28)."""
        if x.shape[-3] == 1:
            x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
        if self.resize and tuple(x.shape[-2:]) != tuple(self.input_size[1:]):
            x = F.interpolate(x, size=tuple(self.input_size[1:]), mode="bilinear",
                              align_corners=False)
        return self.head(self.net.forward_head(self.net.forward_features(x), pre_logits=True))

    def names(self) -> dict[str, list[str]]:
        """Parameter names by role: backbone (frozen, shared by a rank's clients), adapters,
        head."""
        out: dict[str, list[str]] = {"backbone": [], "adapters": [], "head": []}
        for n, _ in self.named_parameters():
            out["head" if n.startswith("head.") else
                "adapters" if ADAPTER in f".{n}" else "backbone"].append(n)
        return out


def insert_adapters(kind: str, net: nn.Module) -> None:
    if kind == "vit_adapter":
        for block in net.blocks:  # x + drop_path2(ls2(mlp(norm2(x)))): the adapter before ls2
            block.ls2 = nn.Sequential(OrderedDict(adapter=Adapter(net.embed_dim), ls=block.ls2))
    else:
        for i, info in enumerate(net.feature_info[-4:], start=1):
            stage = f"layer{i}"
            setattr(net, stage, Staged(getattr(net, stage), ConvAdapter(info["num_chs"])))


def head_for(kind: str, features: int, num_classes: int) -> nn.Module:
    if kind == "vit_adapter":
        return nn.Linear(features, num_classes)
    return nn.Sequential(nn.Linear(features, 128), nn.Linear(128, num_classes))


def build_lpm(kind: str, num_classes: int, backbone: str = "", pretrained: str = "none",
              adapters: bool = True) -> AdaptedModel:
    """The model `kind` (vit_adapter, resnet18_adapter) on timm backbone `backbone` (default:
    the official one), its weights from `pretrained`: a file, "auto" (timm's local cache) or
    "none" (random init); without `adapters`, the backbone and head alone (the linear probe).
    Builds on the current default device (e.g. meta, for counting)."""
    import timm

    name = backbone or OFFICIAL[kind]
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ConfigError(f"model.backbone: {e}") from None
    family = "vit_adapter" if hasattr(net, "blocks") else "resnet18_adapter"
    if family != kind or (kind == "resnet18_adapter" and not hasattr(net, "layer4")):
        raise ConfigError(f"model.backbone: {name} is not a "
                          f"{'VisionTransformer' if kind == 'vit_adapter' else 'ResNet'}, "
                          f"which {kind} needs")
    if pretrained != "none":
        load_backbone(net, name, pretrained)
    for p in net.parameters():
        p.requires_grad_(False)
    if adapters:
        insert_adapters(kind, net)
    size = tuple(net.pretrained_cfg.get("input_size", (3, 224, 224)))
    return AdaptedModel(net, head_for(kind, net.num_features, num_classes), size,
                        resize=kind == "vit_adapter")


def load_backbone(net: nn.Module, name: str, pretrained: str) -> None:
    """Weights into the (adapter-free) backbone; the checkpoint's classifier is left out."""
    path = cached_weights(name) if pretrained == "auto" else Path(pretrained)
    if not path.is_file():
        raise ConfigError(f"model.pretrained: no weights file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as e:  # torch/safetensors raise many types on a damaged file
        raise ConfigError(f"model.pretrained: {path} is not a weights file "
                          f"({type(e).__name__})") from None
    classifier = net.pretrained_cfg.get("classifier", "head")
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"model.pretrained: {path} does not fit {name}: "
                          f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} "
                          f"unexpected (e.g. {unexpected[:2]}) tensors")


def cached_weights(name: str) -> Path:
    """The file of `name`'s default pretrained weights in the local Hugging Face cache, where
    timm keeps them; ConfigError naming what to do if they are not there."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name.split(".")[0])
    repo = (cfg.hf_hub_id if cfg else None) or f"timm/{name}"
    for file in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, file)
        if isinstance(found, str):
            return Path(found)
    raise ConfigError(f"model.pretrained: no weights of {name} in the local cache ({repo}); "
                      "give model.pretrained=PATH (a timm state dict), copy a Hugging Face "
                      "cache that has them, or model.pretrained=none for random weights")

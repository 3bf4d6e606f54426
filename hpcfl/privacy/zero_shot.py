"""GradientHide's labeler as the paper has it: CLIP zero-shot, through open_clip (an optional
extra: pip install -e ".[clip]"), with weights that are already on this machine. Nothing is
downloaded: a run on a compute node without internet must not hang on a download or pick up
weights nobody chose.

Which CLIP: privacy.labeler_model, an open_clip model name (weights privacy.labeler_weights: a
pretrained tag looked up in the local Hugging Face cache, or a file) or local-dir:PATH (a folder
with open_clip_config.json and its weights, as open_clip writes and reads them).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import PrivacyConfig

# CLIP's own zero-shot prompts: its MNIST template for digit classes, its generic one otherwise
DIGIT_PROMPT, PROMPT = 'a photo of the number: "{}".', "a photo of a {}."
IMAGES_PER_BATCH = 256


@dataclass(frozen=True)
class ClipWeights:
    """A CLIP that is on this machine: open_clip's model name and its weights file (None for
    local-dir:, whose folder holds them)."""
    model: str
    file: str | None

    def describe(self) -> str:
        return f"clip:{self.model}" + (f" ({self.file})" if self.file else "")


def find_clip(p: PrivacyConfig) -> ClipWeights | str:
    """The CLIP that privacy.labeler_model / labeler_weights name, or why it cannot be had here."""
    try:
        import open_clip
    except ImportError:
        return "open_clip is not installed (pip install -e \".[clip]\")"
    if p.labeler_model.startswith("local-dir:"):
        folder = Path(p.labeler_model.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            return f"{folder} has no open_clip_config.json"
        if not any(folder.glob(f"*{ext}") for ext in (".safetensors", ".bin", ".pth")):
            return f"{folder} holds no weights (.safetensors, .bin or .pth)"
        return ClipWeights(p.labeler_model, None)
    if p.labeler_model not in open_clip.list_models():
        return f"open_clip has no model {p.labeler_model!r} (open_clip.list_models())"
    if Path(p.labeler_weights).is_file():
        return ClipWeights(p.labeler_model, p.labeler_weights)
    hub = open_clip.get_pretrained_cfg(p.labeler_model, p.labeler_weights).get("hf_hub", "")
    if not hub:
        return (f"{p.labeler_weights!r} is neither a file nor an open_clip tag with Hugging Face "
                f"weights for {p.labeler_model}")
    from huggingface_hub import try_to_load_from_cache
    repo, file = os.path.split(hub)  # open_clip's convention: "org/repo/" or "org/repo/file"
    for name in ([file] if file else ["open_clip_model.safetensors",
                                      "open_clip_pytorch_model.bin"]):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return ClipWeights(p.labeler_model, found)
    return (f"the weights {p.labeler_model}/{p.labeler_weights} are not in the local Hugging Face "
            f"cache ({repo}); copy a cache that has them or give privacy.labeler_weights=FILE")


def prompts(class_names: list[str]) -> list[str]:
    template = DIGIT_PROMPT if all(n.isdigit() for n in class_names) else PROMPT
    return [template.format(n) for n in class_names]


@contextlib.contextmanager
def quiet_root_logger():
    """open_clip logs each loading step at INFO on the root logger, which the runner's log
    would show."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def load(weights: ClipWeights, device: torch.device) -> torch.nn.Module:
    """The CLIP model in eval mode; ValueError naming the weights if they cannot be loaded."""
    import open_clip

    try:
        return open_clip.create_model(weights.model, pretrained=weights.file, device=device,
                                      require_pretrained=True).eval()
    except Exception as e:  # whatever torch, safetensors or pickle raise: the file is at fault
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"cannot load {weights.file or weights.model}: "
                         f"{type(e).__name__}: {first}") from None


def zero_shot(pixels: torch.Tensor, class_names: list[str], weights: ClipWeights
              ) -> torch.Tensor:
    """CLIP's zero-shot class of each image: the prompt of highest cosine similarity.
    `pixels`: (N, C, H, W) floats in [0, 1], grey or RGB; resized (bicubic) to the model's input
    size and normalized with its mean and std, as open_clip's own transform does for a square
    image."""
    import open_clip

    device = pixels.device
    with quiet_root_logger():
        model = load(weights, device)
        tokenizer = open_clip.get_tokenizer(weights.model)
    pre = open_clip.get_model_preprocess_cfg(model)
    mean, std = (torch.tensor(pre[k], device=device).view(1, -1, 1, 1) for k in ("mean", "std"))
    tokens = tokenizer(prompts(class_names)).to(device)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokens), dim=-1)
        labels = []
        for xb in pixels.split(IMAGES_PER_BATCH):
            xb = F.interpolate(xb.expand(-1, 3, -1, -1), size=tuple(pre["size"]),
                               mode="bicubic", align_corners=False).clamp(0, 1)
            image = F.normalize(model.encode_image((xb - mean) / std), dim=-1)
            labels.append((image @ text.T).argmax(1))
    return torch.cat(labels)

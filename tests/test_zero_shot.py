"""GradientHide's CLIP labeler: a real open_clip model (tiny, random weights saved in open_clip's
local-dir format; no CLIP weights can be had here), the lookup of weights in a Hugging Face
cache laid out as on disk, and the one-line errors where CLIP cannot run."""
import json

import h5py
import numpy as np
import open_clip
import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from hpcfl.config import PrivacyConfig, load_config
from hpcfl.loop import run
from hpcfl.main import main
from hpcfl.privacy.defenses.public import public_images
from hpcfl.privacy.zero_shot import ClipWeights, find_clip, prompts, zero_shot
from hpcfl.world import World

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                       "head_width": 16, "pool_type": "avg", "no_ln_pre": True},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1}}
DIGITS = [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """`local-dir:` folder of a 1.6M-parameter CLIP with random weights."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    with torch.no_grad():  # random init maps every digit to one class; louder patches do not
        model.visual.conv1.weight.mul_(10)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def digits_public():
    cfg = load_config(None, ["data.public_fraction=0.1"])
    return public_images(cfg.data, cfg.train.seed, "cpu")


def test_zero_shot_labels_are_the_closest_prompt_and_follow_the_class_names(tiny_clip):
    _, y, pixels = digits_public()
    weights = ClipWeights(tiny_clip, None)
    labels = zero_shot(pixels, DIGITS, weights)
    assert labels.shape == y.shape and labels.dtype == torch.int64
    assert len(torch.unique(labels)) > 1  # not one class for every image
    # by hand, with open_clip's own transform (PIL, bicubic resize, its mean and std)
    model, _, transform = open_clip.create_model_and_transforms(tiny_clip)
    tokens = open_clip.get_tokenizer(tiny_clip)(prompts(DIGITS))
    from PIL import Image
    images = torch.stack([transform(Image.fromarray(
        (p[0].numpy() * 255).round().astype(np.uint8)).convert("RGB")) for p in pixels])
    with torch.no_grad():
        sim = (torch.nn.functional.normalize(model.eval().encode_image(images), dim=-1)
               @ torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).T)
    # PIL's bicubic (a = -0.5, on 8-bit images) differs from torch's (a = -0.75): compare
    # where the closest prompt wins by a clear margin
    top2 = sim.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * (top2[:, 0].abs())
    assert clear.sum() > 20
    assert (labels[clear] == sim.argmax(1)[clear]).float().mean() >= 0.95
    # the class names are what the labels point at: permuted names, permuted labels
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    relabelled = zero_shot(pixels, [DIGITS[i] for i in perm], weights)
    assert torch.equal(perm[relabelled], labels)
    assert prompts(DIGITS)[3] == 'a photo of the number: "3".'
    assert prompts(["cat", "dog"]) == ["a photo of a cat.", "a photo of a dog."]


def test_a_gradienthide_run_labels_with_clip_and_says_so(tiny_clip, tmp_path, caplog):
    over = ["data.num_clients=4", "train.rounds=1", "train.local_steps=1",
            "data.public_fraction=0.1", "privacy.defense=gradienthide", "output.progress=none",
            f"output.dir={tmp_path}", "algorithm.name=fedavg"]
    run(load_config(None, [*over, "output.name=clip", "privacy.hide_labeler=clip",
                           f"privacy.labeler_model={tiny_clip}"]), World("cpu"))
    # auto with no CLIP weights on this machine: the public model, and a line saying why
    run(load_config(None, [*over, "output.name=auto"]), World("cpu"))
    assert "no CLIP" in caplog.text and "not in the local Hugging Face cache" in caplog.text
    _, y, pixels = digits_public()
    expected = zero_shot(pixels, DIGITS, ClipWeights(tiny_clip, None))
    with h5py.File(tmp_path / "clip.h5") as f, h5py.File(tmp_path / "auto.h5") as g:
        assert f.attrs["gradienthide_labeler"] == f"clip:{tiny_clip}"
        assert f.attrs["gradienthide_label_agreement"] == pytest.approx(
            float((expected == y).float().mean()))
        assert g.attrs["gradienthide_labeler"] == "public_model"
        assert g.attrs["gradienthide_label_agreement"] > 0.9  # random CLIP: about chance
        assert f.attrs["gradienthide_label_agreement"] < 0.5
        assert f["metrics/test_acc_mean"][-1] != g["metrics/test_acc_mean"][-1]


def test_weights_are_found_in_a_local_hugging_face_cache_and_never_downloaded(tmp_path,
                                                                              monkeypatch):
    p = PrivacyConfig(labeler_model="ViT-B-32", labeler_weights="openai")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    assert "not in the local Hugging Face cache" in find_clip(p)
    # the cache as huggingface_hub lays it out: refs/main names the snapshot
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"")
    assert find_clip(p) == ClipWeights("ViT-B-32", str(snapshot / "open_clip_model.safetensors"))
    weights = tmp_path / "mine.bin"
    weights.write_bytes(b"")
    assert find_clip(PrivacyConfig(labeler_weights=str(weights))) == ClipWeights("ViT-B-32",
                                                                                 str(weights))
    assert "no model" in find_clip(PrivacyConfig(labeler_model="ViT-Q-99"))
    assert "no open_clip_config.json" in find_clip(
        PrivacyConfig(labeler_model=f"local-dir:{tmp_path}"))


@pytest.mark.parametrize("over, says", [
    (["privacy.labeler_model=ViT-B-32"], "not in the local Hugging Face cache"),
    (["data.name=synthetic-mnist"], "no class names"),
])
def test_clip_that_cannot_run_is_one_line_and_exit_2(tmp_path, capsys, over, says):
    code = main(["privacy.defense=gradienthide", "privacy.hide_labeler=clip",
                 "data.public_fraction=0.1", f"output.dir={tmp_path / 'runs'}", *over])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "runs").exists()


def test_class_names_come_from_the_prepared_file(tmp_path):
    from hpcfl.config import DataConfig
    from hpcfl.data import class_names
    from hpcfl.data.prepare import main as prepare

    from .datafiles import CIFAR_CLASSES, write_cifar10
    write_cifar10(tmp_path / "src")
    assert prepare(["cifar10", "--source", str(tmp_path / "src"), "--out",
                    str(tmp_path / "cifar10.h5")]) == 0
    names = class_names(DataConfig(name="cifar10", root=str(tmp_path)))
    assert names == list(CIFAR_CLASSES)
    assert prompts(names)[3] == f"a photo of a {CIFAR_CLASSES[3]}."
    assert class_names(DataConfig(name="photos")) is None


def test_weights_that_do_not_load_are_one_line_and_exit_2(tmp_path, capsys):
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    (folder / "open_clip_model.safetensors").write_bytes(b"\x07" * 1000)
    code = main(["privacy.defense=gradienthide", "privacy.hide_labeler=clip",
                 f"privacy.labeler_model=local-dir:{folder}", "data.public_fraction=0.1",
                 f"output.dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot load" in err and "SafetensorError" in err
    assert not (tmp_path / "runs").exists()

"""HyperFL-LPM's models: a frozen timm backbone with adapters where the official code puts them,
parameter counts of the official definitions, weights from a local file only."""
import pytest
import torch

from hpcfl.config import ConfigError
from hpcfl.models import HyperNetwork
from hpcfl.models.lpm import build_lpm

TINY = {"vit_adapter": "test_vit", "resnet18_adapter": "test_resnet"}


def counts(model):
    shapes = dict(model.named_parameters())
    adapters = {n: shapes[n].shape for n in model.names()["adapters"]}
    return adapters, sum(p.numel() for p in HyperNetwork(adapters, 64, 128).parameters())


def test_official_adapters_and_hypernetworks_have_the_official_sizes():
    """hyperfl.md §3b: ViT-S/16-384, 12 blocks of 19,608 adapter weights (235,296), hypernetwork
    30,361,504; ResNet-18, 352,000 adapter weights, hypernetwork 45,416,320. On the meta device:
    no weights needed."""
    with torch.device("meta"):
        vit, resnet = build_lpm("vit_adapter", 10), build_lpm("resnet18_adapter", 10)
        (vit_adapters, vit_hyper), (res_adapters, res_hyper) = counts(vit), counts(resnet)
    assert len(vit_adapters) == 12 * 6
    assert sum(s.numel() for s in vit_adapters.values()) == 12 * 19_608 == 235_296
    assert vit_hyper == 30_361_504
    assert sum(s.numel() for s in res_adapters.values()) == 352_000 and res_hyper == 45_416_320
    assert vit.input_size == (3, 384, 384)


@pytest.mark.parametrize("kind", ["vit_adapter", "resnet18_adapter"])
def test_adapters_sit_in_the_frozen_backbone_and_change_its_output(kind):
    torch.manual_seed(0)
    model = build_lpm(kind, 5, backbone=TINY[kind])
    names = model.names()
    assert names["adapters"] and names["head"] and names["backbone"]
    params = dict(model.named_parameters())
    assert not any(params[n].requires_grad for n in names["backbone"])
    x = torch.randn(2, *model.input_size)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    model.train()  # stays in eval mode: BatchNorm statistics are frozen
    out = model(x)
    assert out.shape == (2, 5) and not model.training
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
    with torch.no_grad():  # an adapter's output really enters the forward
        for n in names["adapters"]:
            params[n].add_(torch.randn_like(params[n]))
    assert not torch.allclose(model(x), out)


@pytest.mark.parametrize("kind", ["vit_adapter", "resnet18_adapter"])
def test_weights_load_from_a_timm_state_dict_file_and_a_missing_one_is_one_error(kind, tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model(TINY[kind], pretrained=False)  # with its classifier, as saved
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build_lpm(kind, 5, backbone=TINY[kind], pretrained=str(tmp_path / "w.pth"))
    loaded = dict(model.named_parameters())
    for n, v in source.named_parameters():
        if not n.startswith(source.pretrained_cfg["classifier"]):
            stage = n.split(".")[0]  # resnet stages gained a level: layer1.* -> layer1.stage.*
            mine = (f"net.{stage}.stage.{n[len(stage) + 1:]}" if stage.startswith("layer")
                    else f"net.{n}")
            assert torch.equal(loaded[mine], v), n
    with pytest.raises(ConfigError, match="no weights file"):
        build_lpm(kind, 5, backbone=TINY[kind], pretrained=str(tmp_path / "none.pth"))
    other = "vit_adapter" if kind == "resnet18_adapter" else "resnet18_adapter"
    torch.save(timm.create_model(TINY[other]).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not fit"):
        build_lpm(kind, 5, backbone=TINY[kind], pretrained=str(tmp_path / "other.pth"))
    with pytest.raises(ConfigError, match="not a"):
        build_lpm(kind, 5, backbone=TINY[other])
    with pytest.raises(ConfigError, match="no weights of"):  # nothing in the cache here
        build_lpm(kind, 5, backbone=TINY[kind], pretrained="auto")

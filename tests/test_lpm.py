"""HyperFL-LPM's models: a frozen timm backbone with adapters where the official code puts them,
parameter counts of the official definitions, weights from a local file only."""
import pytest
import torch

from hpcfl.config import ConfigError
from hpcfl.models import HyperNetwork
from hpcfl.models.lpm import build_lpm

TINY = {"vit_adapter": "test_vit", "resnet18_adapter": "test_resnet"}
ADAPTER_NAME = ".adapter."


def counts(model):
    shapes = dict(model.named_parameters())
    adapters = {n: shapes[n].shape for n in model.names()["adapters"]}
    return adapters, sum(p.numel() for p in HyperNetwork(adapters, 64, 128).parameters())


def test_official_adapters_and_hypernetworks_have_the_official_sizes():
    """HyperFL's vit/ and resnet/ (a62bd10): ViT-S/16-384, 12 blocks of 19,608 adapter weights
    (235,296), hypernetwork 30,361,504; ResNet-18, 352,000 adapter weights, hypernetwork 45,416,320. On the meta device:
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


LPM = ["algorithm.name=hyperfl_lpm", "model.pretrained=none", "data.num_clients=4",
       "train.rounds=2", "train.local_steps=3", "train.batch_size=16", "train.device=cpu",
       "output.progress=none"]


def test_hyperfl_lpm_learns_uploads_only_its_hypernetwork_and_never_moves_the_backbone(
        tmp_path):
    import h5py

    from hpcfl.algorithms import build_algorithm
    from hpcfl.config import load_config
    from hpcfl.data import load_federated
    from hpcfl.engine import RoundSpec, train_client
    from hpcfl.main import main

    args = [*LPM, "model.name=vit_adapter", "model.backbone=test_vit"]
    cfg = load_config(None, args)
    data = load_federated(cfg.data, 0)
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    backbone = {k: v.clone() for k, v in algo.constants.items()}
    assert backbone and not set(backbone) & set(algo.init_shared())
    assert all(k.startswith("hypernet.") for k in algo.init_shared())
    trained, _ = train_client(algo, {**algo.init_shared(), **algo.init_client(0)},
                              data.clients[0], RoundSpec(1, 0, 16), 0)
    assert all(torch.equal(algo.constants[k], v) for k, v in backbone.items())
    assert not torch.equal(trained["head.weight"], algo.init_client(0)["head.weight"])

    assert main([*args, f"output.dir={tmp_path}", "output.name=v"]) == 0
    hyper = sum(v.numel() for v in algo.init_shared().values())
    with h5py.File(tmp_path / "v.h5") as f:
        assert f.attrs["status"] == "completed"
        loss = f["metrics/train_loss"][:]
        assert loss[-1] < loss[0]  # it learns
        # the round's buffer: the hypernetwork and 4 bookkeeping slots, in float64
        assert (f["timing/allreduce_bytes"][:] == 8 * (hyper + 4)).all()
    with h5py.File(tmp_path / "v.ckpt.h5") as f:  # no backbone in the checkpoint
        assert set(f["shared"]) == set(algo.init_shared())
        assert sorted(f["private"]) == ["embedding", "head.bias", "head.weight"]


def test_hyperfl_lpm_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    from hpcfl.main import main

    base = [*LPM, "model.name=resnet18_adapter", "model.backbone=test_resnet",
            f"output.dir={tmp_path}"]
    for extra, words in ((["model.pretrained=/nonexistent/w.pth"], "no weights file"),
                         (["algorithm.name=hyperfl"], "go with model.name"),
                         (["model.backbone=test_vit"], "not a ResNet"),
                         (["engine.dtype=bf16"], "CPU autocast cannot")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
    assert not any(tmp_path.iterdir())


def test_hyperfl_lpm_trains_the_same_on_both_engine_paths():
    from hpcfl.algorithms import build_algorithm
    from hpcfl.config import load_config
    from hpcfl.data import load_federated
    from hpcfl.engine import RoundSpec, Slot, train_cohort

    cfg = load_config(None, [*LPM, "model.name=resnet18_adapter", "model.backbone=test_resnet"])
    data = load_federated(cfg.data, 0)
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    shared, cids = algo.init_shared(), [0, 1, 2]
    w = [float(data.num_train[c]) for c in cids]
    seq, vec = (train_cohort(algo, RoundSpec(1, 0, 16, mode=mode, cohort=tuple(cids),
                                             weights=tuple(w)), shared,
                             {c: algo.init_client(c) for c in cids}, data.clients, "cpu").data
                for mode in ("sequential", "vectorized"))
    mean_seq, mean_vec = seq[:-len(Slot)] / seq[-1], vec[:-len(Slot)] / vec[-1]
    # the averaged upload, entries up to 6.5e-3: docs/methods.md, "agree to 2e-8" (6.5e-9 measured)
    assert (mean_seq - mean_vec).abs().max() <= 2e-8
    assert mean_seq.abs().max() > 0


@pytest.mark.parametrize("name, trains", [
    ("fedavg", "head"), ("local", "head"), ("fedavg_adapter", "adapters"),
    ("local_adapter", "adapters")])
def test_the_adapter_and_linear_probe_baselines_train_what_they_should(name, trains, tmp_path):
    """Linear probe (fedavg, local on an LPM model): the head alone, no adapters; the official
    *-Adapter baselines: adapters and head. FedAvg variants share it, Local ones keep it; the
    backbone is constant and never uploaded."""
    import h5py

    from hpcfl.algorithms import build_algorithm
    from hpcfl.config import load_config
    from hpcfl.data import load_federated
    from hpcfl.main import main

    args = [*LPM, f"algorithm.name={name}", "model.name=resnet18_adapter",
            "model.backbone=test_resnet", "train.rounds=1"]
    cfg = load_config(None, args)
    data = load_federated(cfg.data, 0)
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    state = {**algo.init_shared(), **algo.init_client(0)}
    assert any(k.startswith("head.") for k in state)
    assert any(ADAPTER_NAME in k for k in state) == (trains == "adapters")
    assert not set(state) & set(algo.constants) and algo.constants
    assert bool(algo.init_shared()) == name.startswith("fedavg")
    assert main([*args, f"output.dir={tmp_path}", "output.name=b"]) == 0
    shared = sum(v.numel() for v in algo.init_shared().values())
    with h5py.File(tmp_path / "b.h5") as f:
        assert f.attrs["status"] == "completed"
        assert (f["timing/allreduce_bytes"][:] == 8 * (shared + 4)).all()


def test_a_bf16_run_trains_near_its_fp32_twin(tmp_path):
    """engine.dtype=bf16: autocast around local training (a GPU option; CPU autocast runs it
    here); evaluation stays fp32."""
    import h5py

    from hpcfl.main import main

    # 4 of 20 clients (72 images each) train: CPU bf16 matmuls are emulated, ~5x fp32's time
    args = [*LPM, "model.name=vit_adapter", "model.backbone=test_vit", "train.rounds=1",
            "data.num_clients=20", "train.frac=0.2", f"output.dir={tmp_path}"]
    assert main([*args, "output.name=fp32"]) == 0
    assert main([*args, "engine.dtype=bf16", "output.name=bf16"]) == 0
    with h5py.File(tmp_path / "fp32.h5") as a, h5py.File(tmp_path / "bf16.h5") as b:
        la, lb = a["metrics/train_loss"][-1], b["metrics/train_loss"][-1]
    assert la != lb and abs(la - lb) <= 0.05 * abs(la)

import pytest
import torch

from hpcfl.algorithms import build_algorithm
from hpcfl.config import ConfigError, load_config
from hpcfl.models import HyperNetwork, build_model, resolve_name
from hpcfl.models.cnn import CNNS


@pytest.mark.parametrize("name, shape, extractor, hyper", [
    # Counts of the official code (github.com/Pengxin-Guo/HyperFL a62bd10, cnn/models/cnn.py).
    ("cifar_cnn", (3, 32, 32), 106_400, 13_733_920),
    ("mnist_cnn", (1, 28, 28), 115_776, 14_943_424),
    ("digits_cnn", (1, 8, 8), 13_056, 1_692_544),
])
def test_paper_cnns_and_hypernetwork_sizes(name, shape, extractor, hyper):
    model = build_model(name, shape, 10)
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    assert sum(p.numel() for p in model.extractor.parameters()) == extractor
    targets = {k: p.shape for k, p in model.named_parameters() if k.startswith("extractor.")}
    assert sum(p.numel() for p in HyperNetwork(targets).parameters()) == hyper


def test_emnist_head_has_62_classes():
    assert build_model("mnist_cnn", (1, 28, 28), 62)(torch.randn(2, 1, 28, 28)).shape == (2, 62)


def test_model_must_fit_the_data():
    assert resolve_name("auto", (3, 32, 32)) == "cifar_cnn"
    with pytest.raises(ConfigError, match="mnist_cnn expects 1x28x28"):
        resolve_name("mnist_cnn", (1, 8, 8))


def test_hyperfl_gradients_flow_from_the_loss_to_hypernetwork_and_embedding():
    cfg = load_config(None, [])
    algo = build_algorithm(cfg, (1, 8, 8), 10)
    params = {**algo.init_shared(), **algo.init_client(0)}
    for v in params.values():
        v.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(algo.forward(params, torch.randn(4, 1, 8, 8)),
                                             torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, v in params.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, name


def test_generated_weights_are_the_extractor_of_the_target_model():
    cfg = load_config(None, ["data.name=synthetic-cifar10"])
    algo = build_algorithm(cfg, (3, 32, 32), 10)
    theta = algo.extractor_weights({**algo.init_shared(), **algo.init_client(0)})
    model = build_model("cifar_cnn", (3, 32, 32), 10)
    assert {k: v.shape for k, v in theta.items()} == {
        k: p.shape for k, p in model.named_parameters() if k.startswith("extractor.")}


def test_lenet_is_dlgs_for_any_input_shape():
    """DLG's LeNet: 15,826 parameters on 32x32 RGB with 10 classes (GradDefense's victim);
    the same three convolutions on 8x8 digits and 28x28 images."""
    for shape, params, features in (((3, 32, 32), 15826, 768), ((1, 8, 8), 8026, 48),
                                    ((1, 28, 28), 13426, 588)):
        model = build_model("lenet", shape, 10)
        assert sum(p.numel() for p in model.parameters()) == params
        out = model.extractor(torch.rand(2, *shape))
        assert out.shape == (2, features) and 0 < out.min() and out.max() < 1  # sigmoid


def official_order(extractor: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The extractor's forward as the official code writes it: activation, then max-pool."""
    F = torch.nn.functional
    pfl = isinstance(extractor, CNNS["pfl_cnn"][0])
    act = F.relu if pfl else F.leaky_relu
    convs = [m for m in extractor.children() if isinstance(m, torch.nn.Conv2d)]
    if pfl:  # conv relu conv relu pool
        x = F.max_pool2d(act(convs[1](act(convs[0](x)))), 2)
    else:
        for conv in convs:
            x = F.max_pool2d(act(conv(x)), 2)
    return act(extractor.fc1(x.flatten(1)))


@pytest.mark.parametrize("name", ["cifar_cnn", "mnist_cnn", "digits_cnn", "pfl_cnn"])
def test_pooling_before_the_activation_gives_the_official_values_and_gradients(name):
    """The CNNs max-pool before their monotone activation (a quarter of its work): the same
    values and gradients as the official order, activation first."""
    torch.manual_seed(0)
    shape = CNNS[name][2]
    model = build_model(name, shape, 10).double()
    x = torch.randn(6, *shape, dtype=torch.float64)
    ours, official = model.extractor(x), official_order(model.extractor, x)
    assert torch.equal(ours, official)
    params = list(model.extractor.parameters())
    for a, b in zip(torch.autograd.grad(ours.pow(2).sum(), params),
                    torch.autograd.grad(official.pow(2).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)

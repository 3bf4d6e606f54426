"""Analytic routes: what one local step's upload gives away in closed form, before any search.

A Linear layer with a bias, fed u, gets from one image the gradients dW = d u^T and db = d (d:
the loss's gradient at the layer's output), so u = dW^T db / |db|^2 exactly, whatever comes
before or after the layer (Phong et al. 2018; the feature regularizer of breaching; R-GAP's
first step). With B images in the step, dW = sum_i d_i u_i^T / B: their inputs lie in the row
space of dW, of rank <= B. The layer used is the network's first Linear: its input is the
flattened convolutional features, the deepest thing the gradient pins down. The attacks then
search images whose features match (one image) or lie in that space (several), through the
extractor the server knows (FedAvg: the shared model; HyperFL: the generated one, read off the
upload: `hypernet_gradient`).

Labels: for one image, knowing the rest of the network from the layer on (white-box HyperFL:
the private head; FedAvg: all of it), the class c whose loss gives the layer's bias gradient
the direction of the observed one (`labels_through`) is the label; that needs no sign
assumption on the features. FedAvg's own head gives it directly (common.idlg_label), and
for several images their multiset (`batch_labels`, breaching's bias-corrected rule).

Without the head (HyperFL under the server threat), one image's step still tells the gradient
at the head's input: the layer's bias gradient through the known activation (`head_signal`).
A surrogate head that sends exactly that back (`surrogate_head`) replaces the private head and
the label: the extractor's gradient is then a function of the candidate image alone, equal in
direction to the upload's at the true image. The label itself stays unknown (it is not in one
upload without the head).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import Params, Problem
from .hypernet import HypernetProblem

Tensor = torch.Tensor


def first_linear(shapes: dict[str, torch.Size]) -> str | None:
    """The module name of the first Linear layer with a bias among the tensors `shapes` names
    (in their order): a 2-D `.weight` whose `.bias` has as many entries as it has rows."""
    for name, shape in shapes.items():
        if name.endswith(".weight") and len(shape) == 2:
            layer = name[:-len(".weight")]
            bias = shapes.get(layer + ".bias")
            if bias is not None and tuple(bias) == (shape[0],):
                return layer
    return None


def layer_input(algo, params: Params, layer: str) -> Callable[[Tensor], Tensor]:
    """x -> the input of `layer` (a submodule of algo.model) when the model that `params`
    describe runs on x, flattened per image."""
    module = algo.model.get_submodule(layer)

    def inputs(x: Tensor) -> Tensor:
        seen: list[Tensor] = []
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            algo.forward(params, x)
        finally:
            handle.remove()
        return seen[0].flatten(1)
    return inputs


def through(algo, params: Params, layer: str, u: Tensor, shape: tuple) -> Tensor:
    """The logits of the model `params` describe when `layer`'s input is u (rows: images);
    the layers before it see zeros and are overridden."""
    module = algo.model.get_submodule(layer)
    handle = module.register_forward_pre_hook(lambda m, args: (u.view_as(args[0]),))
    try:
        return algo.forward(params, torch.zeros(len(u), *shape, device=u.device))
    finally:
        handle.remove()


def features(weight_grad: Tensor, bias_grad: Tensor, images: int) -> Tensor:
    """One image: the layer's input, (1, in) (any positive or negative multiple of the
    gradients gives the same). Several: an orthonormal basis (in, r) of the row space of the
    weight's gradient (r = images), which holds their inputs."""
    w, b = weight_grad.detach().double(), bias_grad.detach().double()
    if images == 1:
        return ((w.T @ b) / b.pow(2).sum()).to(weight_grad.dtype)[None]
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    return vh[:min(images, len(vh))].T.to(weight_grad.dtype)


@dataclass
class FeatureHint:
    """What one step's upload says of the first Linear layer's input (`features`): the input
    itself (one image) or a basis of the space holding them; `inputs` maps candidate images to
    theirs through the extractor the server knows. `loss` is 0 exactly there."""
    layer: str
    inputs: Callable[[Tensor], Tensor]
    found: Tensor
    weight: float
    surrogate: bool = False  # the label is a surrogate head's (surrogate_head), not a guess

    @property
    def exact(self) -> bool:
        return self.found.shape[0] == 1

    def residual(self, f: Tensor) -> Tensor:
        """Each row of f's relative squared distance from what the upload says."""
        if self.exact:
            return (f - self.found).pow(2).sum(1) / self.found.pow(2).sum()
        inside = (f @ self.found) @ self.found.T
        return (f - inside).pow(2).sum(1) / (f.pow(2).sum(1) + 1e-12)

    def loss(self, x: Tensor) -> Tensor:
        return self.weight * self.residual(self.inputs(x)).mean()

    def error(self, truth: Tensor) -> float:
        """How far the recovery is from the true inputs (rows): the relative error of the one
        input, or the largest relative distance of a true input from the recovered space."""
        return float(self.residual(truth.detach()).max().sqrt())


def hypernet_gradient(p: HypernetProblem) -> Params | None:
    """One step of the hypernetwork's phase, read off its upload: the step's extractor gradient
    up to a positive factor (its clip and learning rate), by tensor. Heads with biases: their
    update is -lr s g; without: the weights' update -lr s g h^T times h (h from the embedding
    the upload gives). None for several steps (their gradients are summed)."""
    if p.steps != 1:
        return None
    o, net = p.observed, p.net
    if o.b is not None:
        flat = -o.b
    else:
        v = p.embedding if p.embedding is not None else o.embedding()
        if v is None:
            return None
        flat = -(o.U @ (o.V.T @ net.h(v)))
    return net.theta(flat)


def labels_through(algo, params: Params, layer: str, u: Tensor, bias_grad: Tensor,
                   num_classes: int, shape: tuple) -> Tensor:
    """One image's label from its input u (1, in) to `layer`, known parameters from the layer
    on, and the layer's observed bias gradient (up to a positive factor): the class whose loss
    gives that gradient's direction."""
    bias = params[layer + ".bias"].detach().requires_grad_()
    known = {**params, layer + ".bias": bias}
    logits = through(algo, known, layer, u.detach(), shape)
    want = F.normalize(bias_grad.detach().flatten(), dim=0)
    fit = []
    for c in range(num_classes):
        (g,) = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([c], device=u.device)),
                                   [bias], retain_graph=True)
        fit.append(float(F.normalize(g.flatten(), dim=0) @ want))
    return torch.tensor([max(range(num_classes), key=fit.__getitem__)], device=u.device)


def head_signal(algo, params: Params, layer: str, u: Tensor, bias_grad: Tensor,
                shape: tuple) -> Tensor | None:
    """For one image: the loss's gradient at the head's input (up to a positive factor), from
    its input u (1, in) to `layer` and the layer's bias gradient (the gradient at the layer's
    output), through the elementwise activation between them (leaky ReLU); None if the head's
    input is not an elementwise function of the layer's output."""
    z = F.linear(u, params[layer + ".weight"], params[layer + ".bias"]).detach()
    z.requires_grad_()
    seen: list[Tensor] = []
    hooks = [algo.model.get_submodule(layer).register_forward_hook(lambda m, args, out: z),
             algo.model.get_submodule("head").register_forward_pre_hook(
                 lambda m, args: seen.append(args[0]))]
    try:
        algo.forward(params, torch.zeros(1, *shape, device=u.device))
    finally:
        for h in hooks:
            h.remove()
    if seen[0].shape != z.shape:
        return None
    (slope,) = torch.autograd.grad(seen[0].sum(), z)
    return bias_grad.detach().view_as(z) / slope


def surrogate_head(signal: Tensor, head: Params) -> tuple[Params, Tensor]:
    """A head and label whose loss sends gradient `signal` (a positive multiple of it) back to
    the head's input: logits (signal . f, 0, ...), label 1. In place of a private head and
    label the server does not know, for one image of one step: the extractor's gradient then
    depends on the candidate image alone, and at the true image it is the upload's."""
    weight = torch.zeros_like(head["head.weight"])
    weight[0] = signal.flatten()
    return ({"head.weight": weight, "head.bias": torch.zeros_like(head["head.bias"])},
            torch.tensor([1], device=signal.device))


def batch_labels(bias_grad: Tensor, images: int) -> Tensor:
    """The labels of a batch of `images` from its last layer's bias gradient, mean over the
    batch of p_i - e_(y_i) (breaching's "bias-corrected" rule): every class whose entry is
    negative, then, each class taken raising its entry by one image's mean share m, the most
    negative again until there are as many labels as images."""
    g = bias_grad.detach().double().flatten().clone()
    negative = torch.nonzero(g < 0).flatten()
    labels = negative[g[negative].argsort()][:images].tolist()
    m = g[g < 0].sum() / images
    g[labels] -= m
    while len(labels) < images:
        c = int(g.argmin())
        labels.append(c)
        g[c] -= m
    return torch.tensor(sorted(labels), device=bias_grad.device)


def attach(p: Problem, algo, gradient: Params, weight: float) -> None:
    """Give `p` what its upload says in closed form when it is one local step and the
    extractor is known (FedAvg; HyperFL read through its hypernetwork): the feature hint of the
    first Linear layer, and, for one image whose label is unknown and whose network from that
    layer on is known (white-box HyperFL), its label. `gradient`: the single-gradient reading
    of the upload (FedAvg's)."""
    if isinstance(p, HypernetProblem):
        if p.start is None or (g := hypernet_gradient(p)) is None:
            return
        params = {**p.net.theta(p.start[1]), **p.head}
        known = not any(k in p.guess for k in p.head)
    else:
        if p.know.steps(p.know.phases[-1], p.num_images) != 1:
            return  # several steps: their gradients are summed
        g, params, known = gradient, p.know.params, not p.guess
    layer = first_linear({k: v.shape for k, v in g.items()})
    try:
        algo.model.get_submodule(layer or "")
    except AttributeError:
        return  # no Linear layer of the model is among the tensors (HyperFL's generic attack)
    if layer is None:
        return
    found = features(g[layer + ".weight"], g[layer + ".bias"], p.num_images)
    if not torch.isfinite(found).all():
        return  # no gradient reached the layer
    p.hint = FeatureHint(layer, layer_input(algo, params, layer), found, weight)
    if p.labels is not None:
        return
    if p.num_images > 1:  # several images: their labels from an uploaded head (FedAvg)
        if not isinstance(p, HypernetProblem) and "head.bias" in g:
            p.labels = batch_labels(g["head.bias"], p.num_images)
        return
    if known:
        p.labels = labels_through(algo, params, layer, found, g[layer + ".bias"],
                                  p.num_classes, p.know.shape)
    elif isinstance(p, HypernetProblem) and set(p.head) == {"head.weight", "head.bias"}:
        signal = head_signal(algo, params, layer, found, g[layer + ".bias"], p.know.shape)
        if signal is not None:  # the server threat: the private head and label replaced
            p.head, p.labels = surrogate_head(signal, p.head)
            p.guess = {k: v for k, v in p.guess.items() if k not in p.head}
            p.hint.surrogate = True

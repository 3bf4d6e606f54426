"""The adaptive attack on a hypernetwork's upload (HyperFL, HyperFL-LPM): recover the client's
embedding and generated extractor from the upload alone, then invert a known extractor.

HyperFL generates a client's extractor tensor k as theta_k = W_k h + b_k, one Linear head per
tensor fed one vector h = relu(T v + t) (the trunk T, t and the client's embedding v). A local
SGD step gives every head the gradients g_k h^T and g_k, and the trunk the gradients d v^T and
d, all scaled by the group's clip. So, once what weight decay alone did to the known starting
weights is taken out (a scalar multiple of them, `decay`), the trunk's update is rank one and
v = R_T^T r_t / |r_t|^2 exactly (the trunk always has a bias; the heads need none), then
h = relu(T v + t) and theta = W h + b: the server knows the extractor the client trained.

Several steps are simulated exactly, through the hypernetwork, but in factored form, with the
engine's own code (hpcfl.algorithms.factored): SGD with momentum and weight decay keeps every
head's weight as W_t = a_t W_0 + sum_s w_ts G_s h_s^T, with G_s the step's clipped extractor
gradient and scalar coefficients a_t, w_ts that depend on the learning rate, momentum and weight
decay alone (`coefficients`). A step then costs two
matrix-vector products with W_0 (theta = a_t W_0 h_t + ..., and the gradient of h) instead of
forming, clipping and stepping a dense gradient of all 13.7M hypernetwork weights; the candidate
upload is compared with the observed one without ever being formed (`Observed`). After one step
the recovery of v is exact; after several, v has moved along the way and the least-squares v is
a mean over the steps: the attack then starts from it and optimizes it with the images (under
the server threat; white-box knows it), and `theta_rel_error` says how far the start was.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ...algorithms import Phase, factored
from ...algorithms.factored import coefficients
from ...algorithms.hyperfl import Layout
from .common import Knowledge, Params, Problem, label_loss

Tensor = torch.Tensor
BLOCK = 16  # steps' gradients stacked together (a step reads every earlier one)


def rel_error(got: Params | Tensor, want: Params | Tensor) -> float:
    """|got - want| / |want| over all tensors together (NaN when want is 0)."""
    if isinstance(got, Tensor):
        got, want = {"": got}, {"": want}
    num = sum(float((got[k].detach().double() - want[k].detach().double()).pow(2).sum())
              for k in want)
    den = sum(float(want[k].detach().double().pow(2).sum()) for k in want)
    return math.sqrt(num / den) if den else float("nan")


def rounding(start: Tensor, steps: int) -> float:
    """About how far float32 rounding alone moves a tensor's update over `steps` steps."""
    return math.sqrt(steps) * 2.0 ** -24 * float(start.double().norm())


class Observed:
    """One client's hypernetwork upload with weight decay's share of the starting weights taken
    out, arranged for the attack: the heads' weights as one (extractor entries, hidden) matrix
    kept as its top `steps` singular directions, U V^T (the gradients' part has rank <= steps;
    the rest is float32 rounding of the decay, 13.7M entries of it on CIFAR-10, which would
    drown a small gradient), the heads' biases as one vector, the trunk's weight and bias."""

    def __init__(self, upload: Params, shared: Params, layout: Layout, phase: Phase,
                 steps: int):
        lr = dict(zip(phase.names, phase.lrs))[layout.trunk[0]]
        self.a, self.w = coefficients(phase, lr, steps)
        moved = {k: upload[k] - (self.a[-1] - 1) * shared[k] for k in upload}
        W = torch.cat([moved[w] for w, _ in layout.heads.values()])
        vals, vecs = torch.linalg.eigh(W.double().T @ W.double())
        self.V = vecs[:, -min(steps, len(vals)):].to(W.dtype)  # (hidden, rank)
        self.U = W @ self.V                                      # (entries, rank)
        self.b = (torch.cat([moved[b] for _, b in layout.heads.values()]) if layout.biased
                  else None)
        self.T, self.t = (moved[k] for k in layout.trunk)
        # Rounding: each of the steps leaves about half an ulp on every entry.
        self.trunk_noise = rounding(shared[layout.trunk[1]], steps)
        self.bias_noise = (rounding(torch.cat([shared[b] for _, b in layout.heads.values()]),
                                    steps) if layout.biased else 0.0)
        self.sq = (self.U.double().pow(2).sum() + sum(
            v.double().pow(2).sum() for v in (self.b, self.T, self.t) if v is not None))

    def empty(self) -> bool:
        """No gradient reached the upload (the client's loss was 0 at every step): it holds
        weight decay and rounding alone, nothing to invert."""
        return self.embedding() is None and (
            self.b is None or float(self.b.double().norm()) <= 10 * self.bias_noise)

    def embedding(self) -> Tensor | None:
        """v from the trunk's rank-one update; None if no gradient reached the trunk (its
        update is rounding alone): h was 0 at every step, whatever v is."""
        den = self.t.double().pow(2).sum()
        if den.sqrt() <= 10 * self.trunk_noise:
            return None
        return (self.T.double().T @ self.t.double() / den).to(self.T.dtype)


@dataclass
class Hypernet:
    """The shared hypernetwork as the factored simulation reads it: every head's starting
    weight as one (extractor entries, hidden) matrix W0 and bias b0, the trunk, the layout."""
    W0: Tensor
    b0: Tensor | None
    trunk: tuple[Tensor, Tensor]
    layout: Layout

    @classmethod
    def of(cls, shared: Params, layout: Layout) -> "Hypernet":
        # the engine's stacking (Heads.base: W_0 column-major, its products 2.4x faster on a CPU)
        W0, b0 = layout.factored().base(shared)
        return cls(W0, b0, tuple(shared[k].detach() for k in layout.trunk), layout)

    def h(self, v: Tensor | None, trunk: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """relu(T v + t); v None stands for an embedding whose h is 0 (see Observed)."""
        T, t = trunk or self.trunk
        return torch.relu(T @ v + t) if v is not None else torch.zeros_like(t)

    def theta(self, flat: Tensor) -> Params:
        """The flat extractor as named, shaped tensors."""
        out, i = {}, 0
        for name, shape in self.layout.shapes.items():
            n = shape.numel()
            out[name] = flat[i:i + n].view(shape)
            i += n
        return out

    def generate(self, v: Tensor | None) -> Params:
        h = self.h(v)
        return self.theta(self.W0 @ h + (self.b0 if self.b0 is not None else 0))


class HypernetProblem(Problem):
    """The inversion of a known extractor behind a hypernetwork upload: the phases before the
    hypernetwork's (HyperFL's head epoch) simulated as usual on the generated extractor, then
    the hypernetwork's phase simulated exactly in factored form from the client's embedding,
    and the candidate's upload compared with the observed one (`Observed`). `head`: the
    client's private tensors besides its embedding; `guess` (in `p`) holds those the server
    does not know, the embedding among them where it is not known exactly."""

    def __init__(self, p: Problem, net: Hypernet, observed: Observed, phases: list[Phase],
                 embedding: Tensor | None, head: Params, steps: int):
        super().__init__(p.know, [], p.num_images, p.num_classes, p.labels, p.guess,
                         p.multi_step)
        *self.before, self.phase = phases
        self.net, self.observed, self.embedding, self.head, self.steps = (
            net, observed, embedding, head, steps)
        # A known embedding: the start (h and W h + b) is the same at every iteration.
        known = net.layout.embedding not in p.guess
        self.start = self.begin(embedding) if known else None

    def begin(self, v: Tensor | None) -> tuple[Tensor, Tensor]:
        """h and the flat extractor W h + b at embedding v (None: h is 0, see Observed)."""
        net = self.net
        h = net.h(v)
        return h, net.W0 @ h + (net.b0 if net.b0 is not None else 0)

    def errors(self, algo, truth: Params, unknown: Params) -> dict[str, float]:
        """How far the extractor the server read off the upload is from the client's true one
        (`truth`: its state before the round, which the simulation knows): theta_rel_error and
        h_rel_error; with `unknown` (an attack's end values), the same after the attack
        optimized the embedding (theta_rel_error_final)."""
        theta, h = algo.extractor_weights(truth), algo.rank_one_input(truth)
        read = self.observed.embedding()
        out = {"theta_rel_error": rel_error(self.net.generate(read), theta),
               "h_rel_error": rel_error(self.net.h(read), h)}
        final = unknown.get(self.net.layout.embedding)
        # not optimized: the attack ends with the embedding it read off (or, white-box, knew)
        out["theta_rel_error_final"] = rel_error(
            self.net.generate(final if final is not None else self.embedding), theta)
        return out

    def distance(self, x: Tensor, y: Tensor, unknown: Params, kind: str = "cosine") -> Tensor:
        v = unknown.get(self.net.layout.embedding, self.embedding)
        start = self.start or self.begin(v)
        head = {k: unknown.get(k, t) for k, t in self.head.items()}
        know = self.know
        if self.before:  # the head trains on the generated extractor, which stays put
            theta = self.net.theta(start[1])
            first = Knowledge(know.forward, {**theta, **head}, (), know.shape, know.low,
                              know.high, tuple(self.before), know.batch_size)
            guess = {**theta, **{k: t for k, t in unknown.items() if k in head}}
            head = {k: t for k, t in first.trained(x, y, guess).items() if k in head}
        return self.compare(*self.simulate(x, y, v, head, start), kind)

    def simulate(self, x: Tensor, y: Tensor, v: Tensor | None, head: Params,
                 start: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """The hypernetwork phase from embedding v (h and W h + b there: `start`), exactly as
        PhaseSGD trains it: returns the steps' clipped extractor gradients G (steps, entries),
        their h (steps, hidden) and the trunk after the phase. The gradients of h, the trunk and
        v follow by the chain rule from the extractor's: dL/dh = W_t^T g."""
        net, ph, o = self.net, self.phase, self.observed
        lr = dict(zip(ph.names, ph.lrs))
        lr_h, lr_v = lr[net.layout.trunk[0]], lr[net.layout.embedding]
        bias = float(net.b0 is not None)
        T, t = net.trunk
        G: list[Tensor] = []  # the steps' clipped extractor gradients
        H: list[Tensor] = []
        blocks: dict[int, Tensor] = {}  # G stacked BLOCK steps at a time, once they are all in

        def stacked() -> list[Tensor]:
            for j in range(len(G) // BLOCK):
                if j not in blocks:
                    blocks[j] = torch.stack(G[j * BLOCK:(j + 1) * BLOCK])
            rest = G[len(blocks) * BLOCK:]
            return [*blocks.values(), *([torch.stack(rest)] if rest else [])]

        buf: dict[str, Tensor] = {}
        for i, b in enumerate(self.know.batches(len(x), self.steps)):
            w = torch.tensor(o.w[i], dtype=T.dtype, device=T.device).split(BLOCK)
            earlier = ([(Gj, Hj, wj) for (Gj, Hj), wj in
                        zip(zip(stacked(), torch.stack(H).split(BLOCK)), w)] if i else [])
            if i == 0:
                h, flat = start
            else:
                h = torch.zeros_like(t) if v is None else net.h(v, (T, t))
                flat = factored.theta(net.W0, net.b0, o.a[i], earlier, h)
            if not flat.requires_grad:  # a constant start: still the variable of the loss
                flat = flat.detach().requires_grad_()
            loss = label_loss(self.know.forward({**net.theta(flat), **head}, x[b]), y[b])
            (g,) = torch.autograd.grad(loss, [flat], create_graph=True)
            scale = vscale = 1.0
            if v is None:  # h stays 0: neither the trunk nor v gets a gradient
                gT, gt, gv = torch.zeros_like(T), torch.zeros_like(t), None
            else:
                dh = factored.pull_back(net.W0, o.a[i], earlier, g)
                gt = dh * (T @ v + t > 0)  # relu'
                gT, gv = torch.outer(gt, v), T.T @ gt
            if ph.grad_clip > 0:  # clip_grad_norm_ per group: the hypernetwork, the embedding
                sq = factored.sq_norm(g, h, bias > 0) + gT.pow(2).sum() + gt.pow(2).sum()
                scale = torch.clamp(ph.grad_clip / (sq.sqrt() + 1e-6), max=1.0)
                if gv is not None:
                    vscale = torch.clamp(ph.grad_clip / (gv.norm() + 1e-6), max=1.0)
            G.append(g * scale)
            H.append(h)
            steps = [("T", T, gT * scale, lr_h), ("t", t, gt * scale, lr_h)]
            if v is not None:
                steps.append(("v", v, gv * vscale, lr_v))
            new = {}
            for name, p, d, rate in steps:
                d = d + ph.weight_decay * p
                buf[name] = d if i == 0 or not ph.momentum else ph.momentum * buf[name] + d
                new[name] = p - rate * buf[name]
            T, t, v = new["T"], new["t"], new.get("v")
        return torch.cat(stacked()), torch.stack(H), (T, t)

    def compare(self, G: Tensor, H: Tensor, trunk: tuple[Tensor, Tensor], kind: str) -> Tensor:
        """1 - cosine (or the squared distance) between the candidate's upload and the observed
        one, weight decay's share of the start taken out of both; the heads' weights
        sum_s w_s G_s h_s^T are never formed."""
        o, w = self.observed, torch.tensor(self.observed.w[-1], dtype=G.dtype,
                                           device=G.device)
        a = o.a[-1]
        T0, t0 = self.net.trunk
        RT, Rt = trunk[0] - a * T0, trunk[1] - a * t0
        wG = w[:, None] * G
        dot = ((wG @ o.U) * (H @ o.V)).sum() + (RT * o.T).sum() + (Rt * o.t).sum()
        sq = (wG @ wG.T * (H @ H.T)).sum() + RT.pow(2).sum() + Rt.pow(2).sum()
        if o.b is not None:
            Rb = wG.sum(0)
            dot, sq = dot + (Rb * o.b).sum(), sq + Rb.pow(2).sum()
        if kind == "cosine":
            return 1 - dot / (sq.sqrt() * o.sq.sqrt().to(sq.dtype) + 1e-12)
        return sq - 2 * dot + o.sq.to(sq.dtype)


def adapt(p: Problem, algo, upload: Params, shared: Params) -> HypernetProblem:
    """The generic problem `p` (through the whole hypernetwork) turned into the inversion of
    the client's extractor (`HypernetProblem`). The embedding: white-box, the client's; under
    the server threat, the one read off the upload (`Observed.embedding`), optimized further
    with the images unless the recovery is exact (one step of the hypernetwork's phase).
    The phases simulated are the problem's (p.know.phases; all the algorithm's if none); without
    p.multi_step, the single-gradient shortcut: the upload is taken for one step on all the
    candidate images."""
    layout = algo.layout()
    phases = list(p.know.phases or algo.phases())
    steps = p.know.steps(phases[-1], p.num_images)
    if not p.multi_step:
        steps = 1
        p = replace(p, know=replace(p.know, batch_size=0))
    observed = Observed(upload, shared, layout, phases[-1], steps)
    v, guess = p.know.params[layout.embedding].detach(), dict(p.guess)
    if layout.embedding in guess:  # the server threat: v is what the upload says
        v = observed.embedding()
        if v is None or steps == 1:  # h is 0; or v is exact
            del guess[layout.embedding]
        else:
            guess[layout.embedding] = v
    head = {k: t for k, t in p.know.params.items() if k not in shared and k != layout.embedding}
    return HypernetProblem(Problem(p.know, [], p.num_images, p.num_classes, p.labels, guess,
                                   p.multi_step),
                           Hypernet.of(shared, layout), observed, phases, v, head, steps)

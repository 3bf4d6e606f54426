"""The engine: one round's local training on a rank, for any Algorithm, and the evaluation of
clients (docs/ARCHITECTURE.md, "The round").

A rank trains its members of the round's cohort (`RoundSpec`) from the shared state in one of
two ways with the same semantics (tested to agree within float32 rounding): sequential (one
client after another, engine.client) or vectorized (the members of each block of client ids
stacked along a client axis, engine.stacked). Each client's upload goes through the run's
defense, if any, and is summed into the round's one buffer (`RoundBuffer`), which the loop
Allreduces. The engine names no defense: it calls the hooks of the interface below.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.func import vmap

from ..algorithms import Algorithm, Params
from ..data import ClientData
from ..data.transforms import model_inputs
from ..sgd import upload
from .client import SampleTransform, Trained, minibatches, run_client, train_client
from .compiled import compile_unavailable
from .round import ROUND_DTYPE, RoundBuffer, RoundSpec, Slot, add_into
from .stacked import run_stack, train_stacked

AUTO_MODE = {"cpu": "sequential", "cuda": "vectorized"}  # see resolve_mode


@dataclass
class ClientUpload:
    """What a defense's upload hook sees of one client of one round: who it is, its data, its
    state before and after local training."""
    client: int
    round: int
    data: ClientData
    start: Params
    trained: Params

    @cached_property
    def inputs(self) -> torch.Tensor:
        """The client's training images as the model sees them."""
        return model_inputs(self.data, self.data.x_train)


class DefenseHooks:
    """The engine's side of a defense (privacy.defenses.Defense implements it)."""

    def per_sample(self, rnd: int, cids: list[int], device) -> SampleTransform | None:
        return None

    def upload(self, upload: Params, client: ClientUpload) -> Params:
        return upload

    def sees_upload(self) -> bool:
        """Whether `upload` is overridden: then the engine forms every client's upload (a
        hypernetwork's factored heads are otherwise summed as one product, never formed)."""
        return type(self).upload is not DefenseHooks.upload


def flatten(params: Params, names) -> torch.Tensor:
    return torch.cat([params[n].reshape(-1) for n in names]) if names else torch.zeros(0)


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    """Views into `flat` shaped like `like` (same order)."""
    out, i = {}, 0
    for n, v in like.items():
        out[n] = flat[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


@contextlib.contextmanager
def precision(dtype: str, device: torch.device):
    """engine.dtype for local training only: fp32; tf32 (CUDA matmuls and convolutions in
    TF32); bf16 (autocast: matmuls and convolutions in bfloat16, on CUDA, or on the CPU where it
    is supported). The round's buffer and the optimizer state stay float32/float64 either way,
    and torch's global TF32 flags are restored on exit, so evaluation runs in fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    try:
        with (torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
              if dtype == "bf16" else contextlib.nullcontext()):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def resolve_mode(mode: str, device: torch.device) -> str:
    """engine.mode=auto: AUTO_MODE of the device type (on a CPU the path `python -m hpcfl.bench`
    measured faster; on CUDA a choice not yet measured: docs/performance.md)."""
    if mode != "auto":
        return mode
    return AUTO_MODE[torch.device(device).type]


def train_cohort(algo: Algorithm, spec: RoundSpec, shared: Params, private: dict[int, Params],
                 data: dict[int, ClientData], device: torch.device,
                 defense: DefenseHooks | None = None) -> RoundBuffer:
    """Train this rank's members of the cohort (spec.cohort, their private state in `private`)
    from `shared`, stack by stack; update their private state in place; return the round's
    buffer, ready for the Allreduce. Clients are trained with the defense's per-sample
    transform where it has one. A hypernetwork's factored heads (Phase.factored) are added as
    one product per stack, in either mode (a stack's sum, in float32, is the same on any rank
    count); every other tensor's upload is added one client at a time. A defense that sees
    uploads gets each client's, formed once, and it is added as it returns it
    (docs/factored.md)."""
    numel = sum(v.numel() for v in shared.values())
    made: list[tuple[RoundBuffer, Params]] = []

    def buffer() -> tuple[RoundBuffer, Params]:
        """The round's buffer and its views by name, made at the first upload: a rank's first
        stack trains without it beside it (float64: 110 MB for CIFAR-10 HyperFL)."""
        if not made:
            buf = RoundBuffer.zeros(numel, device)
            made.append((buf, unflatten(buf.upload, shared)))
        return made[0]
    # the factored layers' shared weights stacked once per round, read by every client
    bases = {k: p.factored.base(shared) for k, p in enumerate(algo.phases()) if p.factored}
    formed = defense is not None and defense.sees_upload()
    # every stack's product written into one buffer, made at the first (a fresh 55 MB tensor
    # per stack costs its page faults again: 120 ms on a 2-core VM, 6x the time to read it)
    out: list[torch.Tensor] = []

    def add(cid: int, trained: Trained, member: int) -> None:
        """A client's private state back, its upload added: all of it where the defense sees
        uploads (the factored layers' formed, once), else all but the factored layers."""
        state, loss, record = trained
        if spec.mode != "sequential":  # the loss stays on the device: no wait here
            state, loss = {**shared, **{n: v[member] for n, v in state.items()}}, loss[member]
        start = {**shared, **private[cid]}
        private[cid] = {n: state[n].detach() for n in private[cid]}
        factored = record.heads.names if record is not None else ()
        up = algo.upload({k: v for k, v in shared.items() if k not in factored}, state)
        buf, sums = buffer()
        if not formed:  # the factored layers: the stack's product (below)
            for k, v in up.items():
                add_into(sums[k], v.detach(), weight[cid])
            buf.count(weight[cid], loss)
            return
        if record is not None:
            up.update(upload([(record, member, 1.0)]))
            state = {**state, **{k: shared[k] + up[k] for k in factored}}
        up = defense.upload(up, ClientUpload(cid, spec.round, data[cid], start, state))
        buf.add(flatten(up, shared.keys()).detach(), weight[cid], loss)

    def per_sample(cids: list[int]) -> SampleTransform | None:
        return defense.per_sample(spec.round, cids, device) if defense is not None else None

    weight = dict(zip(spec.cohort, spec.weights))
    for members in spec.trained_together():
        if spec.mode == "sequential":  # one after another
            parts = []
            for cid in members:
                trained = run_client(algo, {**shared, **private[cid]}, data[cid], spec, cid,
                                     per_sample([cid]), bases)
                add(cid, trained, 0)
                parts.append((trained.record, 0, weight[cid]))
        else:
            trained = run_stack(algo, shared, private, data, list(members), spec,
                                per_sample(list(members)), bases)
            for i, cid in enumerate(members):
                add(cid, trained, i)
            parts = [(trained.record, i, weight[cid]) for i, cid in enumerate(members)]
        if not formed and parts[0][0] is not None:  # the stack's factored layers: one product
            out = out or [torch.empty_like(parts[0][0].W0)]
            sums = buffer()[1]
            for k, v in upload(parts, out[0]).items():
                add_into(sums[k], v)
    return buffer()[0]


@torch.no_grad()
def evaluate_client(algo: Algorithm, params: Params, data: ClientData,
                    batch: int = 4096) -> tuple[int, float]:
    """(number correct, summed cross-entropy) of one client's model on its test split."""
    x, y = data.x_test, data.y_test
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = algo.forward(params, model_inputs(data, x[i:i + batch]))
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
        loss += float(F.cross_entropy(logits, y[i:i + batch], reduction="sum"))
    return correct, loss


@torch.no_grad()
def evaluate_stack(algo: Algorithm, shared: Params, private: Params,
                   clients: list[ClientData]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every client's (number correct, summed cross-entropy) on its test split, all at once:
    their private state stacked along dim 0 (`private`), their test images padded to the
    largest set, one vmap of the model over clients (HyperFL generates the stack's extractors in
    one batched call). The caller keeps a stack's images within memory (EVAL_IMAGES)."""
    most = max(c.num_test for c in clients)
    x = torch.stack([torch.cat([c.x_test, c.x_test[:1].expand(most - c.num_test,
                                                              *c.x_test.shape[1:])])
                     for c in clients])
    y = torch.stack([torch.cat([c.y_test, c.y_test[:1].expand(most - c.num_test)])
                     for c in clients])
    real = torch.arange(most, device=y.device)[None, :] < torch.tensor(
        [c.num_test for c in clients], device=y.device)[:, None]
    inputs = model_inputs(clients[0], x.flatten(0, 1)).view(*x.shape[:2], *x.shape[2:])
    logits = vmap(lambda p, xi: algo.forward({**shared, **p}, xi),
                  in_dims=(0, 0))(private, inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    correct = ((logits.argmax(-1) == y) & real).sum(1)
    return correct, (loss * real).sum(1)


__all__ = ["ROUND_DTYPE", "ClientUpload", "DefenseHooks", "RoundBuffer", "RoundSpec",
           "SampleTransform", "Slot", "compile_unavailable", "evaluate_client", "evaluate_stack",
           "flatten", "minibatches", "precision", "resolve_mode", "run_client", "run_stack",
           "train_client", "train_cohort", "train_stacked", "unflatten"]

"""PPSGD (Bietti et al., "Personalization improves privacy-accuracy tradeoffs in federated
learning", ICML 2022, https://arxiv.org/abs/2202.05318) as the HyperFL paper's baseline (official
code cnn/methods/ppsgd.py): extractor shared, head private. At every step of local_epochs epochs
the client takes a non-private SGD step on its head (lr = algorithm.head_lr, batch-mean
gradient) and a DP-SGD step on the extractor; it uploads only the extractor's change.

Both gradients come from the same forward pass, as in the official code, which computes the
per-sample extractor gradients through the graph of that forward after stepping the head
(PyTorch refuses that backward: the head's weights were changed in place; so the official
PPSGD does not run as written, and the simultaneous step is what its one forward intends)."""
from __future__ import annotations

from .base import Phase
from .centaur import SharedExtractor


class PPSGD(SharedExtractor):
    name = "ppsgd"

    def phases(self) -> list[Phase]:
        a, t = self.cfg.algorithm, self.cfg.train
        return [Phase(param_groups=(self.head, self.extractor), lr=t.lr,
                      param_group_lrs=(a.head_lr, t.lr),
                      momentum=t.momentum, weight_decay=t.weight_decay, epochs=t.local_epochs,
                      steps=t.local_steps, dp=self.dp)]

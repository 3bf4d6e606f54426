"""engine.compile: the local step's gradient function (forward, loss, backward; per client or
vmapped over a stack) through torch.compile. The optimizer step stays eager: it works in place
on the trainable tensors and costs a few passes over memory, where a compiled graph gains little.
The per-sample step (DP-SGD, a defense's per-sample clip) stays eager too: with torch 2.14
dynamo cannot trace a stack's vmap of per-sample vmaps with dynamic shapes (it falls back to
eager), and one client's per-sample vmap compiles once per batch size (98 s on a 2-core CPU for
the four sizes of a 4-client dpfedavg round).

A compiled function is built once per algorithm and kind of step and kept while the algorithm
lives: dynamo guards on what a step's closure holds, so a fresh closure per client would compile
again for every client. `dynamic=True`: one graph for (nearly) every batch and stack size, not a
recompile at the second size. Every step's graphs are cached on functorch's wrapper code, which
they share, so torch's limit of 8 graphs per code object (past it: eager, and a warning) is
raised: HyperFL's two phases x two size ranges x two paths x dtypes pass 8 in one bench.
On CUDA the graph is captured as CUDA graphs (mode "reduce-overhead"); nowhere else.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch
from torch.utils._pytree import tree_map

_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def local_step(algo, key: Hashable, make: Callable[[], Callable], compile: bool,
               device) -> Callable:
    """make()'s step, or its compiled form kept for (algo, key) when `compile`; `key` names
    everything make() depends on besides the algorithm (eager or per-sample, vmap's in_dims)."""
    if not compile:
        return make()
    steps = _STEPS.setdefault(algo, {})
    key = (key, torch.device(device).type)
    if key not in steps:
        steps[key] = _compile(make(), torch.device(device))
    return steps[key]


RECOMPILE_LIMIT = 64


def _compile(fn: Callable, device: torch.device) -> Callable:
    import torch._dynamo.config as dynamo
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    if device.type != "cuda":
        return torch.compile(fn, dynamic=True)
    graphed = torch.compile(fn, mode="reduce-overhead", dynamic=True)

    def step(*args):
        # A CUDA graph's outputs live in its memory pool and the next replay overwrites them;
        # the loop keeps each step's loss until the phase ends, so they are copied out.
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                        graphed(*args))
    return step


def compile_unavailable(device) -> str | None:
    """Why torch.compile cannot run on `device` here (no C++ compiler for the CPU, no Triton
    for CUDA, ...), in one line; None when a small function compiles and runs."""
    try:
        probe = torch.compile(lambda x: (x * 2 + 1).sum(), dynamic=False)
        probe(torch.ones(8, device=device))
    except Exception as e:  # any failure of the toolchain: the caller names the key
        lines = [s for s in str(e).splitlines() if s.strip()]
        return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
    return None

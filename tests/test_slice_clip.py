"""random_slice's optional per-sample clipping (GradDefense's clip.py): at every local step,
each sample's gradient on each of its client's perturbed slices clipped to
privacy.slice_sample_clip."""
import numpy as np
import torch

from hpcfl.algorithms import build_algorithm
from hpcfl.config import load_config
from hpcfl.data import load_federated
from hpcfl.engine import RoundSpec, flatten, train_client, train_cohort
from hpcfl.privacy.defenses.random_slice import clip_slices, slice_ids

from .test_defenses import ready


def slice_norms(g: torch.Tensor, ids: torch.Tensor, m: int) -> torch.Tensor:
    """(B, m): each sample's L2 norm on each slice, by hand."""
    return torch.stack([torch.stack([row[ids == j].norm() for j in range(m)]) for row in g])


def test_each_samples_part_of_each_chosen_slice_is_clipped_and_nothing_else():
    bounds = np.array([0, 7, 7, 12, 22])  # slice 1 empty, as slice_bounds may give
    ids_flat = torch.from_numpy(slice_ids(bounds))
    assert ids_flat.tolist() == [0] * 7 + [2] * 5 + [3] * 10
    ids = {"a": ids_flat[:12], "b": ids_flat[12:]}
    torch.manual_seed(0)
    grads = {"a": torch.randn(2, 5, 3, 4), "b": torch.randn(2, 5, 10), "c": torch.randn(2, 5, 2)}
    grads["a"][:, 0] *= 1e-3  # sample 0: under the bound, left as it is
    chosen = torch.tensor([[True, False, False, True], [False, True, True, False]])
    bound = 0.5
    out = clip_slices(grads, ids, chosen, bound, lead=2)  # a group of two clients
    assert torch.equal(out["c"], grads["c"])
    for i in range(2):
        before = torch.cat([grads["a"][i].flatten(1), grads["b"][i]], 1)
        after = torch.cat([out["a"][i].flatten(1), out["b"][i]], 1)
        nb, na = slice_norms(before, ids_flat, 4), slice_norms(after, ids_flat, 4)
        for j in range(4):
            if chosen[i, j]:
                assert torch.allclose(na[:, j], nb[:, j].clamp(max=bound), atol=1e-6)
                # scaled, not reshaped: the same direction
                part = ids_flat == j
                if part.any():
                    scale = na[:, j] / nb[:, j]
                    assert torch.allclose(after[:, part], before[:, part] * scale[:, None],
                                          atol=1e-6)
            else:
                assert torch.equal(after[:, ids_flat == j], before[:, ids_flat == j])
        # one client alone (the sequential path) gives its row of the group
        one = clip_slices({k: v[i] for k, v in grads.items()}, ids, chosen[i], bound, lead=1)
        assert all(torch.allclose(one[k], out[k][i]) for k in grads)
    assert (slice_norms(grads["b"][0], ids_flat[12:], 4)[:, 3] > bound).all()  # it bit


def setup(*over):
    cfg = load_config(None, ["algorithm.name=fedavg", "data.num_clients=6",
                             "data.public_fraction=0.1", "privacy.defense=random_slice",
                             "privacy.slice_noise=0", "train.local_steps=1",
                             "train.momentum=0", "train.weight_decay=0", *over])
    data = load_federated(cfg.data, 0)
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    return cfg, data, algo, ready(cfg, algo, data), algo.init_shared()


def test_local_training_clips_the_chosen_slices_per_sample_and_only_them():
    bound = 1e-3
    cfg, data, algo, once, shared = setup(f"privacy.slice_sample_clip={bound}")
    ids = torch.from_numpy(slice_ids(once.bounds))
    for cid in range(3):
        clip = once.per_sample(1, [cid], torch.device("cpu"))
        assert clip is not None
        plain, _ = train_client(algo, dict(shared), data.clients[cid], RoundSpec(1, 0, 50), cid)
        clipped, _ = train_client(algo, dict(shared), data.clients[cid], RoundSpec(1, 0, 50),
                                  cid, clip=clip)
        step = [flatten({k: shared[k] - v[k] for k in shared}, shared) for v in (plain, clipped)]
        chosen = once.chosen(once.stream(1, cid, torch.device("cpu")))
        assert sorted(torch.nonzero(clip.chosen[0])[:, 0].tolist()) == sorted(chosen.tolist())
        for j in range(cfg.privacy.slices):
            part = ids == j
            if j in chosen.tolist():  # one step: lr times a mean of vectors of norm <= bound
                assert step[1][part].norm() <= cfg.train.lr * bound * (1 + 1e-5)
                assert step[0][part].norm() > 10 * cfg.train.lr * bound
            else:  # the plain step, up to the order of the mean over samples
                assert torch.allclose(step[1][part], step[0][part], atol=1e-7)
    # with a bound nothing reaches, training is plain training (per-sample mean = batch mean)
    cfg, data, algo, once, shared = setup("privacy.slice_sample_clip=1e9", "train.local_steps=3")
    clip = once.per_sample(1, [0], torch.device("cpu"))
    plain, _ = train_client(algo, dict(shared), data.clients[0], RoundSpec(1, 0, 50), 0)
    loose, _ = train_client(algo, dict(shared), data.clients[0], RoundSpec(1, 0, 50), 0,
                            clip=clip)
    assert all(torch.allclose(plain[k], loose[k], atol=1e-6) for k in shared)


def test_both_engine_paths_clip_alike_hyperfl_included():
    """HyperFL's hypernetwork phase trains uploaded tensors: per-sample gradients, no rank-one
    shortcut; its head phase trains private tensors only and is left as it is."""
    from .test_engine import settle
    for algorithm in ("fedavg", "hyperfl"):
        cfg, data, algo, once, shared = setup(f"algorithm.name={algorithm}",
                                              "privacy.slice_sample_clip=1e-2",
                                              "train.local_steps=2",
                                              "train.momentum=0.5")
        cids = [0, 3]
        start = {c: algo.init_client(c) for c in cids}
        settle(algo, shared, start, data, cids, 2 if algorithm == "hyperfl" else 0)

        def mean_upload(mode):
            private = {c: dict(p) for c, p in start.items()}
            spec = RoundSpec(3, 0, 50, mode=mode, cohort=tuple(cids),
                             weights=tuple(float(data.num_train[c]) for c in cids))
            buf = train_cohort(algo, spec, shared, private, data.clients, torch.device("cpu"),
                               once).data
            return buf[:-4] / buf[-1]
        clipped = {mode: mean_upload(mode) for mode in ("sequential", "vectorized")}
        assert (clipped["sequential"] - clipped["vectorized"]).abs().max() <= 1e-5, algorithm
        cfg.privacy.slice_sample_clip = 0
        assert (mean_upload("sequential") - clipped["sequential"]).abs().max() > 1e-3, algorithm

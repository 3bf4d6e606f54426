"""The GAN-prior attack (GIFD) with a generator hpcfl trains on a public split."""
import h5py
import pytest
import torch

from hpcfl.attack import main as attack
from hpcfl.config import load_config
from hpcfl.data import load_federated, load_public
from hpcfl.privacy.attacks.gifd import project_l1
from hpcfl.privacy.generator import load_generator
from hpcfl.privacy.train_generator import main as train_generator

# 600 digits clients, each with one training image; 30 % of the digits are public.
DIGITS = ["data.name=digits", "data.partition=iid", "data.num_clients=600",
          "data.test_fraction=0.5", "data.public_fraction=0.3", "algorithm.name=fedavg",
          "train.local_epochs=1", "train.lr=0.1", "train.device=cpu", "output.progress=none"]


def test_the_public_split_is_held_out_from_every_client():
    cfg = load_config(None, DIGITS)
    data = load_federated(cfg.data, 0)
    x_pub, y_pub, *_ = load_public(cfg.data, 0)
    assert len(y_pub) == round(0.3 * 1797)
    held = {tuple(x.flatten().tolist()) for c in data.clients.values()
            for x in (*c.x_train, *c.x_test)}
    public = {tuple(x.flatten().tolist()) for x in x_pub}
    # load_digits has a few duplicate images; the split is by sample, so allow those
    assert len(held & public) <= 3
    assert sum(data.num_train) + sum(data.num_test) + len(y_pub) == 1797
    no_public = load_federated(load_config(None, DIGITS[:4]).data, 0)
    assert sum(no_public.num_train) + sum(no_public.num_test) == 1797


def test_l1_projection_lands_on_the_nearest_point_of_the_ball():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 2, 4, 4, generator=g)
    r = torch.tensor([1.0, 5.0, 1e3])
    p = project_l1(d, r)
    assert torch.allclose(p[2], d[2])  # inside: unchanged
    for i in range(2):
        assert p[i].abs().sum() == pytest.approx(r[i].item(), rel=1e-5)
        # soft thresholding by one theta: the projection's form (Duchi et al.)
        theta = (d[i].abs() - p[i].abs())[p[i] != 0]
        assert torch.allclose(theta, theta[0].expand_as(theta), atol=1e-5)
        assert (torch.sign(p[i]) * torch.sign(d[i]) >= 0).all()


def test_gifd_beats_inverting_gradients_on_its_generators_domain(tmp_path):
    """Same budget (iterations per target), same targets (4 clients of one digit each): the GAN
    prior trained on the public split reconstructs far better than IG; an untrained generator
    of the same shape does not, so the prior, not the parametrization, is what helps."""
    for name, steps in (("trained", 600), ("untrained", 1)):
        assert train_generator(["data.public_fraction=0.3", "train.device=cpu", "--steps",
                                str(steps), "--width", "16", "--batch", "32",
                                "--out", str(tmp_path / f"{name}.pt")]) == 0
    gen, record = load_generator(str(tmp_path / "trained.pt"))
    assert record["public_images"] == 539 and record["steps"] == 600
    assert gen.num_stages == 2 and tuple(gen.shape) == (1, 8, 8)
    common = [*DIGITS, f"output.dir={tmp_path}", "attack.clients=4", "attack.iterations=150"]
    psnr = {}
    for name, extra in (("ig", []), ("gifd", [f"attack.generator={tmp_path}/trained.pt"]),
                        ("untrained", [f"attack.generator={tmp_path}/untrained.pt"])):
        out = f"output.name={name}"
        assert attack([*common, out, f"attack.name={'ig' if name == 'ig' else 'gifd'}",
                       *extra]) == 0
        with h5py.File(tmp_path / f"{name}.h5") as f:
            g = f[f"privacy/{'ig' if name == 'ig' else 'gifd'}"]
            psnr[name] = g["psnr"][:].mean()
            assert g["targets"][:].tolist() == [0, 1, 2, 3]
    assert psnr["gifd"] > psnr["ig"] + 5, psnr
    assert psnr["gifd"] > psnr["untrained"] + 5, psnr


def test_generator_mistakes_are_one_line(tmp_path, capsys):
    base = [*DIGITS, f"output.dir={tmp_path}", "attack.name=gifd", "attack.iterations=2"]
    assert attack(base) == 2
    assert "attack.generator=FILE" in capsys.readouterr().err
    assert attack([*base, f"attack.generator={tmp_path}/none.pt"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert attack([*base, f"attack.generator={tmp_path}/junk.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a generator" in err
    # a photos generator cannot make digits
    assert train_generator(["data.name=photos", "data.public_fraction=0.5", "--steps", "1",
                            "--width", "4", "--out", str(tmp_path / "photos.pt")]) == 0
    assert attack([*base, f"attack.generator={tmp_path}/photos.pt"]) == 2
    assert "(3, 32, 32) images" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.h5"))  # no results file from any mistake
    # no public split: nothing to train on, no file written
    assert train_generator(["--out", str(tmp_path / "g.pt")]) == 2
    assert "public_fraction" in capsys.readouterr().err
    assert not (tmp_path / "g.pt").exists()


def linear_knowledge(classes: int):
    """What the attack knows of a one-layer classifier of 8x8 images into `classes`."""
    from hpcfl.privacy.attacks import Knowledge
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, classes))
    params = {k: v.detach() for k, v in model.named_parameters()}
    return Knowledge(lambda p, x: torch.func.functional_call(model, p, (x,)), params,
                     tuple(params), (1, 8, 8), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))


def test_gifd_maps_labels_when_the_generators_classes_differ(tmp_path):
    """A generator of 10 digit classes attacking a task of 5 classes optimizes a mixture of
    its classes: it finds the image's label, its images stay in the data range, and the
    gradient distance falls (measured: 1.06 after 1 iteration, 0.114 after 30)."""
    from hpcfl.config import AttackConfig
    from hpcfl.privacy.attacks import Problem, gifd
    from hpcfl.privacy.generator import Generator
    torch.manual_seed(0)
    know = linear_knowledge(5)
    gen = Generator((1, 8, 8), 10, 8, 4).eval().requires_grad_(False)
    x_true = torch.rand(1, 1, 8, 8)
    target = know.gradient(x_true, torch.tensor([2]))
    first, r = (gifd(Problem(know, target, 1, 5, multi_step=False),
                     AttackConfig(iterations=n), gen) for n in (1, 30))
    assert r.x.shape == (1, 1, 8, 8) and r.labels.tolist() == [2]
    assert 0 <= r.x.min() and r.x.max() <= 1
    assert r.loss < 0.3 * first.loss


def test_each_gifd_stage_starts_from_the_features_the_stage_before_optimized():
    """Stage 2 starts from stage 1's optimized 4x4 features carried one stage forward, not from
    the latent's again (which would throw stage 1's search away)."""
    from hpcfl.config import AttackConfig
    from hpcfl.privacy.attacks import Problem, gifd
    from hpcfl.privacy.generator import Generator

    class Recording(Generator):
        def finish(self, h, k):
            seen.setdefault(k, []).append(h.detach().clone())
            return super().finish(h, k)

    seen: dict[int, list] = {}
    torch.manual_seed(0)
    know = linear_knowledge(10)
    gen = Recording((1, 8, 8), 10, 8, 4).eval().requires_grad_(False)
    target = know.gradient(torch.rand(1, 1, 8, 8), torch.tensor([2]))
    gifd(Problem(know, target, 1, 10, torch.tensor([2]), multi_step=False),
         AttackConfig(iterations=30, radius=10.0), gen)
    stage1, stage2 = seen[1][10:], seen[2]  # seen[1][:10]: stage 0's images, made from h_1
    assert len(stage1) == len(stage2) == 10
    assert not torch.equal(stage1[-1], stage1[0])  # stage 1 moved its features
    # one more step of stage 1 separates its last candidate from where stage 2 starts
    moved = (stage2[0] - gen.blocks[0](stage1[-1])).abs().max()
    assert moved < (stage2[0] - gen.blocks[0](stage1[0])).abs().max()
    assert moved <= 0.5 * (stage1[-1] - stage1[0]).abs().max()

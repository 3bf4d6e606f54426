"""`python -m hpcfl.attack [CONFIG.yaml] [section.key=value ...]`: attack what clients upload.

Trains the run to the round before `attack.round` (with the run's own code, `hpcfl.loop.run`;
a rerun reuses its checkpoint), lets the engine train the first `attack.clients` clients of that
round's cohort exactly as the run does, and attacks each client's upload with what an
honest-but-curious server knows: the architecture, the round's shared state, the client's
local training recipe (phases, steps, learning rates, batch size). The targets are the images
of the uploaded phase's batches (hpcfl.victim), not the client's whole data. Under
`attack.threat=server` the client's private state (HyperFL's embedding and head) is unknown:
the attacker starts from the common initial value and optimizes it with the images; under
`white-box` it is known (as the attacked phase starts). Writes /privacy/<attack.name>/ into the
run's results file, a PNG of truth (top) against reconstruction (bottom) beside it, and prints
one summary line. A target whose upload carries none of its images (each image's gradient
below float32 resolution) is named and left out of the means. The run is left checkpointed at
the round before (round 0 for an attack of round 1) under its own name (hpcfl.loop.default_name
unless output.name is set): `python -m hpcfl.main` of the same config finishes it in that file
(docs/cluster.md, "Attack, then finish the run").

With no arguments: FedSGD, one local step on one digit of a FedAvg client, attacked by
Inverting Gradients (docs/privacy-verdict.md).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import (AttackConfig, ConfigError, RunConfig, describe, is_plugin, load_config,
                     parse_stored)
from .experiment import check_same_experiment
from .data import load_federated
from .cli import Command
from .lock import lock_output
from .loop import build, default_name, prepare_defense, round_spec, run, sample_cohort, to_device
from .placement import deal_stacks
from .privacy.attacks import (Knowledge, Problem, Reconstruction, analytic, attack_class, dlg,
                              gifd, gradient_from_update, idlg_label, inverting_gradients)
from .privacy.attacks.common import total_variation
from .privacy.attacks.hypernet import HypernetProblem, adapt, rel_error
from .privacy.defenses import Defense, build_defense
from .privacy.generator import Generator, load_generator
from .privacy.metrics import image_scores, label_accuracy, to_unit
from .progress import progress
from .private import PrivateTable
from .store import NotResults, checkpoint_paths, load_checkpoint, read_results
from .attack_record import RECOVERY, means, write
from .victim import Round, Target, simulate, target_count
from .world import World

log = logging.getLogger("hpcfl")
# The no-argument attack: FedSGD's protocol, one local step on one image, of the first of 20
# clients of ~67 real digits each (with algorithm.name=X: that method's upload). Its image is
# visible in the upload for every method (HyperFL's head epoch fits some images so well that
# their gradient is 0; photos clients of 1-5 images are all fit so: docs/privacy-verdict.md).
DEFAULT = ["data.name=digits", "data.partition=iid", "data.num_clients=20",
           "algorithm.name=fedavg", "train.batch_size=1", "train.local_steps=1", "train.lr=0.1",
           "attack.iterations=2000"]
USAGE = """usage: python -m hpcfl.attack [CONFIG.yaml] [section.key=value ...]

Attacks the uploads of attack.clients clients in round attack.round of the run the config
describes, and writes /privacy/<attack.name> into its results file. Without CONFIG.yaml the
run is: """ + " ".join(DEFAULT) + "\n\nKeys:\n"


def parse(argv: list[str]) -> RunConfig:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + describe())
        raise SystemExit(0)
    path = next((a for a in argv if "=" not in a), None)
    overrides = [a for a in argv if a != path]
    return load_config(path, overrides if path else [*DEFAULT, *overrides])


def state_before(cfg: RunConfig, world: World, algo, mine: list[int]
                 ) -> tuple[dict, dict, Path]:
    """Shared state after round attack.round - 1 and the private state of this rank's targets
    (`mine`), from the run's checkpoint (trained now, by all ranks, unless it exists: for round
    1, the run's start, checkpointed as a run that `python -m hpcfl.main` of the same config
    finishes), and the run's results file."""
    a = cfg.attack
    path = Path(cfg.output.dir) / f"{cfg.output.name}.h5"
    if a.round == 1 and world.on_main(path.exists):
        # Every run of this experiment starts from the same state: nothing to read but that
        # the file is this experiment's results file.
        lock = lock_output(cfg.output, world)  # the run's lock, as any writer of its file
        try:
            world.on_main(lambda: check_run_file(cfg, path))
        finally:
            if lock is not None:
                lock.release()
        return (to_device(algo.init_shared(), world.device),
                {c: to_device(algo.init_client(c), world.device) for c in mine}, path)
    path = Path(run(cfg, world, until=a.round - 1)["path"])
    world.from_main(None)  # rank 0 writes the checkpoint: read it once it is there
    span = range(min(mine), max(mine) + 1) if mine else range(0)
    table = PrivateTable(algo.init_client(0), span, world.device)
    ck = load_checkpoint(checkpoint_paths(path)[0], table)
    if ck.round != a.round - 1:
        raise ConfigError(f"output.name: {path} holds a run at round {ck.round}, not "
                          f"{a.round - 1}; choose another output.name for this attack")
    private = {c: {k: v[0] for k, v in table.get([c]).items()} for c in mine}
    return to_device(ck.shared, world.device), private, path


def check_run_file(cfg: RunConfig, path: Path) -> None:
    """The file an attack of round 1 writes into is a results file of this experiment (checked
    now, not when the attack's results are written)."""
    try:
        stored = read_results(path)
    except NotResults as e:
        raise ConfigError(f"output.name: {path} exists and is not an hpcfl results file "
                          f"({e}); choose another output.name") from None
    check_same_experiment(parse_stored(stored.config, path), cfg, path)


def load_prior(cfg: RunConfig, shape: tuple, device: torch.device) -> Generator:
    """attack.generator, checked against the data it is to reconstruct."""
    if not cfg.attack.generator:
        raise ConfigError("attack.name=gifd needs attack.generator=FILE (python -m "
                          "hpcfl.privacy.train_generator data.public_fraction=0.2 --out FILE)")
    try:
        gen, record = load_generator(cfg.attack.generator, device)
    except ValueError as e:
        raise ConfigError(f"attack.generator: {e}") from None
    if tuple(gen.shape) != tuple(shape):
        raise ConfigError(f"attack.generator: makes {tuple(gen.shape)} images, the run's data "
                          f"are {tuple(shape)}")
    d = cfg.data
    if record["data"] == d.name and (record["public_fraction"] != d.public_fraction
                                     or record["seed"] != cfg.train.seed):
        log.warning("attack.generator was trained on the public split of %s with "
                    "public_fraction %s and seed %s, but this run holds out %s with seed %s: "
                    "the clients' images may be among its training images", d.name,
                    record["public_fraction"], record["seed"], d.public_fraction,
                    cfg.train.seed)
    return gen


def problem_for(cfg: RunConfig, algo, sim: Round, shared: dict, target: Target,
                defense: Defense | None) -> tuple[Problem, dict]:
    """What the attack inverts, knowing what an honest-but-curious server knows; with
    attack.adaptive, through the structure of the upload where the algorithm has one; with
    attack.analytic, with what one step's upload gives in closed form. Also returns the
    client's true state where the attack's simulation starts (for the scores).

    White-box knows the client's private state when the attacked phase starts; the server
    guesses it from the public initial value, and simulates the earlier phases (HyperFL's head
    epoch) from there when their images are all targets, else optimizes that state directly."""
    a, t = cfg.attack, cfg.train
    client, cid = target.data, target.client
    phases = tuple(algo.phases())
    whole = a.threat == "server" and sim.covered and len(phases) > 1
    state = sim.before if whole else sim.last
    guess = {} if a.threat == "white-box" else to_device(algo.init_client(cid),
                                                         client.y_train.device)
    # The attack that breaks Soteria: match every uploaded tensor but those the defense hides.
    hidden = defense.defended if a.mute_defended_layer and defense is not None else ()
    matched = tuple(k for k in sim.upload if k not in hidden)
    know = Knowledge(algo.forward, {**state, **guess}, matched,
                     tuple(client.x_train.shape[1:]), (0 - client.mean) / client.std,
                     (1 - client.mean) / client.std, phases=phases if whole else phases[-1:],
                     batch_size=t.batch_size)
    grad = gradient_from_update(sim.upload, shared, t.lr, t.weight_decay)
    multi = a.multi_step and a.name != "dlg"  # DLG matches one gradient
    n = len(sim.y)
    labels = idlg_label(grad) if n == 1 and "head.weight" in grad else None
    p = Problem(know, [(sim.upload if multi else grad)[k] for k in matched], n,
                target.num_classes, labels, guess, multi)
    if a.adaptive and hasattr(algo, "layout"):
        p = adapt(p, algo, sim.upload, shared)
    if a.analytic:
        analytic.attach(p, algo, {k: grad[k] for k in matched}, a.feature_weight)
    return p, state


def truth_loss(p: Problem, a: AttackConfig, x: torch.Tensor, y: torch.Tensor,
               state: dict) -> float:
    """The attack's loss at the client's true images, labels and unknown tensors (which the
    simulation knows): far below the attack's own final loss, the upload identifies the images
    and the optimizer did not find them; near it, the objective cannot tell them apart."""
    unknown = {k: state[k].detach().clone().requires_grad_() for k in p.guess}
    if p.hint is not None and p.hint.surrogate:
        y = p.labels  # the surrogate head's own label: with it, not the true one, it sends the
        # upload's gradient back (a true label 0 would send it reversed, a distance of 2)
    if a.name == "dlg":
        return float((p.distance(x, y, unknown, "euclidean") + p.penalty(x)).detach())
    return float((p.distance(x, y, unknown) + a.tv * total_variation(x) + p.penalty(x)).detach())


def iterations(a: AttackConfig, generator: Generator | None) -> int:
    """Optimizer steps of one attack (GIFD shares attack.iterations among its stages)."""
    if a.name == "gifd":
        stages = generator.num_stages + 1
        return a.restarts * stages * max(a.iterations // stages, 1)
    return a.iterations * (1 if a.name == "dlg" else a.restarts)


def attack_client(cfg: RunConfig, algo, state: tuple[dict, dict], target: Target,
                  defense: Defense | None = None, prior: Generator | None = None,
                  bar=None) -> dict:
    """Train the target client in attack.round as the run does, attack its upload. `state`:
    the shared state and the client's private state at the start of the round."""
    a, (shared, private) = cfg.attack, state
    client, cid = target.data, target.client
    sim = simulate(algo, (shared, private), target, defense)
    p, truth_state = problem_for(cfg, algo, sim, shared, target, defense)
    empty = sim.empty or (isinstance(p, HypernetProblem) and p.observed.empty())
    if empty:
        log.warning("client %d: its upload carries none of its %d target image(s) (every "
                    "image's gradient is below float32 resolution; HyperFL: its head epoch fit "
                    "them): not attacked; scored as a mid-gray guess, left out of the means",
                    cid, len(sim.y))
        rec = Reconstruction((0.5 - client.mean) / client.std * torch.ones_like(sim.x), None,
                             float("nan"))
        if bar is not None:
            bar.update(iterations(a, prior))
    else:
        rec = run_attack(p, a, prior, (cfg.train.seed, bar), basin_start(sim, a, client,
                                                                           cfg.train.seed))
    found = (p.errors(algo, truth_state, rec.unknown)
             if isinstance(p, HypernetProblem) else {})
    found.update(unknown_errors(p, rec.unknown, truth_state))
    if p.hint is not None and not empty:
        # of the visible images: an invisible one is in no upload, nor are its features
        true = analytic.layer_input(algo, sim.last, p.hint.layer)(sim.x[~sim.invisible])
        found["feature_rel_error"] = p.hint.error(true)
    truth = to_unit(sim.x, client.mean, client.std)
    x = to_unit(rec.x, client.mean, client.std)
    scores = image_scores(x, truth)
    order = np.argsort(scores["matched"])  # reconstructions in the order of their truths
    return dict(psnr=scores["psnr"].mean(), ssim=scores["ssim"].mean(),
                label_acc=(np.nan if rec.labels is None or (p.hint is not None and
                                                             p.hint.surrogate)  # no label
                           else label_accuracy(rec.labels, sim.y)), loss=rec.loss,
                truth_loss=truth_loss(p, a, sim.x, sim.y, truth_state),
                **{k: found.get(k, np.nan) for k in RECOVERY}, images=len(sim.y),
                empty=empty, multi_step=p.multi_step, image_psnr=scores["psnr"][order],
                share=sim.share, invisible=sim.invisible, index=sim.index,
                reconstruction=(x[order] * 255).round().astype(np.uint8),
                truth=(truth * 255).round().astype(np.uint8))


def run_attack(p: Problem, a: AttackConfig, prior: Generator | None, run: tuple,
               start: torch.Tensor | None) -> Reconstruction:
    """attack.name on problem p; `run`: the seed and the progress bar."""
    seed, bar = run
    if is_plugin(a.name):
        return attack_class(a.name)(a, seed).reconstruct(p, bar)
    if a.name == "dlg":
        return dlg(p, a, seed, bar)
    if a.name == "gifd":
        return gifd(p, a, prior, seed, bar)
    return inverting_gradients(p, a, seed, bar, start=start)


def basin_start(sim: Round, a: AttackConfig, client, seed: int) -> torch.Tensor | None:
    """attack.basin > 0: the true images plus Gaussian noise of std attack.basin in [0, 1]
    pixels, boxed to valid pixels (where the basin test starts); else None (random images)."""
    if a.basin <= 0:
        return None
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(sim.x.shape, generator=gen).to(sim.x.device) * a.basin / client.std
    return torch.max(torch.min(sim.x + noise, (1 - client.mean) / client.std),
                     (0 - client.mean) / client.std)


def unknown_errors(p: Problem, final: dict, truth: dict) -> dict[str, float]:
    """How far the unknown private tensors besides the embedding (HyperFL's head) were from the
    client's at the start (the guess) and at the end of the attack."""
    names = [k for k in p.guess if k != "embedding"]
    if not names:
        return {}
    want = {k: truth[k] for k in names}
    return {"head_rel_error": rel_error({k: p.guess[k] for k in names}, want),
            "head_rel_error_final": rel_error({k: final.get(k, p.guess[k]) for k in names},
                                              want)}


def attack(cfg: RunConfig, world: World) -> str | None:
    """Train or resume the run to the attacked round, attack this rank's share of the targets,
    write every rank's results (rank 0). Returns the summary line on rank 0."""
    a = cfg.attack
    if not cfg.output.name:  # the run's own name: python -m hpcfl.main of it finishes it
        cfg.output.name = default_name(cfg)
    if is_plugin(a.name):
        attack_class(a.name)  # not an Attack: one line, before any work
    if cfg.data.name.startswith("synthetic-"):
        raise ConfigError(f"data.name={cfg.data.name}: synthetic images have no pixel range "
                          "to reconstruct; attack digits, photos or a prepared dataset")
    if a.round > cfg.train.rounds:
        raise ConfigError(f"attack.round={a.round} is past the run's train.rounds="
                          f"{cfg.train.rounds}")
    if world.device.type == "cuda":
        # Reconstructions backpropagate to the images through upsampling (GIFD's generator,
        # LPM's resize), which has no deterministic CUDA kernel: warn there instead of stopping.
        # Every op that has a deterministic kernel still uses it.
        torch.use_deterministic_algorithms(True, warn_only=True)
    defense = build_defense(cfg.privacy, cfg.train.seed)
    # first: a population too large for memory is refused here, not by the cohort's draw
    data = world.agree(lambda: load_federated(cfg.data, cfg.train.seed, world.device))
    cohort = sample_cohort(cfg.train.seed, a.round, cfg.data.num_clients, cfg.train.frac)
    targets = cohort[:a.clients]
    # Each rank attacks the targets dealt to it, by their images, and reads only their data.
    dealt = deal_stacks([(c,) for c in targets], data.num_train, world.size)
    mine = sorted(c for s in dealt.of(world.rank) for c in s)
    algo = build(cfg, data, world.device)
    if a.basin > 0 and a.name != "ig":
        raise ConfigError("attack.basin: the basin test starts Inverting Gradients near the "
                          "truth; it needs attack.name=ig")
    if not algo.init_shared():
        raise ConfigError(f"algorithm.name={cfg.algorithm.name} uploads nothing: there is "
                          "nothing to attack")
    last = algo.phases()[-1]
    if a.name == "idlg" and (cfg.algorithm.name == "hyperfl" or any(
            target_count(last, data.num_train[c], cfg.train.batch_size) != 1 for c in targets)):
        raise ConfigError("attack.name=idlg reads the label of one image from the last "
                          "layer's gradient: it needs uploads of one image (one step of "
                          "train.batch_size=1, or clients of one training image) and an "
                          "algorithm that uploads the head (not hyperfl)")
    prepare_defense(defense, cfg, world, algo, data.num_classes)
    prior = load_prior(cfg, data.shape, world.device) if a.name == "gifd" else None
    shared, private, path = state_before(cfg, world, algo, mine)
    t0, results = time.perf_counter(), []
    bar = progress(len(mine) * iterations(a, prior),
                   cfg.output.progress if world.is_main else "none", f"{a.name} attack")
    for cid in mine:
        spec = round_spec(cfg, "sequential", a.round, [(cid,)], data)
        target = Target(spec, cid, data.clients[cid], data.num_classes)
        r = attack_client(cfg, algo, (shared, private[cid]), target, defense, prior, bar)
        results.append(dict(r, client=cid))
    bar.close()
    gathered = world.gather_to_main(results)
    lock = lock_output(cfg.output, world)  # /privacy goes into the run's file under its lock
    if not world.is_main:
        return None
    results = sorted((r for rank in gathered for r in rank),
                     key=lambda r: targets.index(r["client"]))
    try:
        png = write(path, cfg, results)
    finally:
        lock.release()
    mean, empty = means(results), sum(r["empty"] for r in results)
    left = f", {empty} with an empty upload left out of the means" if empty else ""
    return (f"{a.name} on {cfg.algorithm.name} ({a.threat}), {cfg.data.name}, round {a.round}, "
            f"{len(targets)} client(s), {sum(r['images'] for r in results)} target image(s)"
            f"{left}{f' on {world.size} ranks' if world.size > 1 else ''}: PSNR "
            f"{mean['psnr']:.2f} dB, SSIM {mean['ssim']:.3f}, label accuracy "
            f"{mean['label_acc']:.2f} in {time.perf_counter() - t0:.0f} s -> {path}, {png}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="hpcfl: %(message)s", stream=sys.stderr)
    cmd = Command("hpcfl.attack")
    with cmd:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        line = attack(cfg, cmd.start(cfg.train.device, cfg.engine.threads))
    if cmd.code:
        return cmd.code
    if line:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every option of a run: typed dataclasses, YAML files, `a.b=value` overrides, validation.

This module is the single source of option names, defaults and help text (`python -m hpcfl.main
--help` prints them). A run is configured by an optional YAML file whose sections mirror the
dataclasses below, then by command-line overrides; anything unknown, mistyped or out of range
raises ConfigError with one line naming the key and what is allowed.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .oneline import one_line


class ConfigError(ValueError):
    """A user mistake in the configuration: reported as one line, exit code 2. `every_rank`:
    raised on every rank together (World.agree, World.on_main), so the ranks can simply exit;
    one raised on a single rank must end the others (hpcfl.cli.Command)."""

    def __init__(self, line: str, every_rank: bool = False):
        super().__init__(line)
        self.every_rank = every_rank


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are ConfigErrors, one line and exit code 2 from the
    command like any other mistake (argparse's own print its usage as well, several lines)."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def opt(default, help: str, choices: tuple = (), min: float | None = None,
        max: float | None = None, min_exclusive: bool = False, max_exclusive: bool = False,
        plugin: bool = False):
    """A config field with its help text and the values it allows; `plugin`: also a user's
    class, `module:Class` (PLUGIN)."""
    return field(default=default, metadata=dict(help=help, choices=choices, min=min, max=max,
                                                min_exclusive=min_exclusive,
                                                max_exclusive=max_exclusive, plugin=plugin))


# A user's own algorithm, defense or attack: `module:Class`, the module found on the Python path
# (PYTHONPATH, or the working directory), e.g. privacy.defense=mydef:Halve (docs/extending.md).
PLUGIN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def is_plugin(value: str) -> bool:
    return PLUGIN.fullmatch(value) is not None


def load_class(key: str, ref: str, base: type) -> type:
    """The class `ref` (module:Class) names, imported now, checked to subclass `base`; one line
    (ConfigError) when the module is not on the path, fails to import, has no such class, or the
    class is another kind. Each registry's room calls it with its own base class."""
    module, name = ref.split(":")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise ConfigError(f"{key}={ref}: no module {module!r} on the Python path (put its "
                              "folder on PYTHONPATH, or run from it)") from None
        raise ConfigError(f"{key}={ref}: importing {module} failed ({one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - the user's module, whatever it raises: one line
        raise ConfigError(f"{key}={ref}: importing {module} failed ({type(e).__name__}: "
                          f"{one_line(e)})") from None
    cls = getattr(found, name, None)
    if cls is None:
        raise ConfigError(f"{key}={ref}: module {module} ({getattr(found, '__file__', '?')}) "
                          f"has no {name}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}={ref}: {name} is not a subclass of {base.__module__}."
                          f"{base.__qualname__}")
    return cls


DATASETS = ("digits", "synthetic-cifar10", "synthetic-mnist", "photos", "mnist", "fmnist",
            "emnist", "cifar10", "cinic10")
LPM_MODELS = ("vit_adapter", "resnet18_adapter")  # frozen timm backbones with adapters
MODELS = ("auto", "digits_cnn", "mnist_cnn", "cifar_cnn", "pfl_cnn", "lenet", *LPM_MODELS)
DP_ALGORITHMS = ("dpfedavg", "ppsgd", "centaur")  # DP-SGD baselines: noise set by privacy.dp_*
LPM_ALGORITHMS = ("hyperfl_lpm", "fedavg_adapter", "local_adapter")  # need an LPM model
DTYPES = ("fp32", "tf32", "bf16")  # engine.dtype
ALGORITHMS = ("hyperfl", "fedavg", "local", *LPM_ALGORITHMS, *DP_ALGORITHMS)


@dataclass
class DataConfig:
    name: str = opt("digits", "dataset: digits, synthetic-* and photos (scikit-image's 20 "
                    "sample photographs at 32x32, to attack) are built in; mnist, fmnist, "
                    "emnist, cifar10, cinic10 read <root>/<name>.h5 (python -m "
                    "hpcfl.data.prepare)", choices=DATASETS)
    root: str = opt("data", "directory of the prepared dataset files")
    num_clients: int = opt(20, "number of simulated clients", min=1)
    partition: str = opt("shards", "how samples are spread over clients: iid; shards (each "
                         "client gets classes_per_client classes); dirichlet (label mix "
                         "~ Dirichlet(dirichlet_alpha)); noniid_s (the official split of the "
                         "paper: train from the train split, test from the test split with the "
                         "same label mix); sampled (each client draws local_size images from "
                         "the pool by (seed, client) alone: any population, e.g. a million)",
                         choices=("iid", "shards", "dirichlet", "noniid_s", "sampled"))
    noniid_s: float = opt(20.0, "partition=noniid_s: percent of a client's images spread over "
                          "all classes; the rest come from its group of dominant classes",
                          min=0, max=100)
    local_size: int = opt(0, "partition=noniid_s: training images per client, 0 = the official "
                          "600 (emnist 1000); partition=sampled: 0 = 20", min=0)
    classes_per_client: int = opt(3, "classes per client with partition=shards", min=1)
    dirichlet_alpha: float = opt(0.5, "concentration with partition=dirichlet, and of "
                                 "label_skew (small = skewed)", min=0, min_exclusive=True)
    label_skew: bool = opt(False, "partition=sampled: each client's label mix drawn from "
                           "Dirichlet(dirichlet_alpha) by (seed, client); false: the pool's")
    # 1 would hold out everything: no client would have a training sample
    test_fraction: float = opt(0.25, "share of each client's samples held out as its test "
                               "split (every partition but noniid_s)",
                               min=0, max=1, min_exclusive=True, max_exclusive=True)
    public_fraction: float = opt(0.0, "share of the training split that no client holds: "
                                 "the public data of python -m hpcfl.privacy.train_generator "
                                 "(and of defenses that need public data)", min=0, max=1,
                                 max_exclusive=True)
    synthetic_samples: int = opt(6000, "total samples of a synthetic-* dataset", min=10)
    augment: str = opt("auto", "random crop (padding 4) + horizontal flip of training batches: "
                       "true, false, or auto (the official transform of the dataset: on for "
                       "cifar10 and cinic10)", choices=("auto", "true", "false"))


@dataclass
class ModelConfig:
    name: str = opt("auto", "network; auto picks the paper's CNN for the dataset's shape; "
                    "lenet: DLG's sigmoid LeNet (GradDefense's victim), any input shape; "
                    "vit_adapter, resnet18_adapter: a frozen pretrained timm backbone with "
                    "adapters (algorithm.name hyperfl_lpm, fedavg_adapter, local_adapter, or "
                    "fedavg / local: the linear probe)", choices=MODELS)
    backbone: str = opt("", "vit_adapter / resnet18_adapter: the timm model; empty = the "
                        "official vit_small_patch16_384 / resnet18")
    pretrained: str = opt("auto", "vit_adapter / resnet18_adapter: the backbone's weights: a "
                          "local file (timm state dict), auto (timm's local cache; never a "
                          "download) or none (random, for tests and timing)")


@dataclass
class AlgorithmConfig:
    name: str = opt("hyperfl", "federated method, or a user's own: module:Class, a subclass of "
                    "hpcfl.algorithms.Algorithm (docs/extending.md)", choices=ALGORITHMS,
                    plugin=True)
    embed_dim: int = opt(64, "hyperfl: size of each client's private embedding", min=1)
    hidden_dim: int = opt(128, "hyperfl: hidden width of the hypernetwork", min=1)
    head_lr: float = opt(0.1, "hyperfl, centaur, ppsgd: learning rate of the head (official "
                         "lr_g)", min=0,
                         min_exclusive=True)
    head_epochs: int = opt(1, "hyperfl, centaur: epochs training only the head first",
                           min=0)
    grad_clip: float = opt(50.0, "hyperfl: gradient-norm clip (clip_grad_norm_) of the "
                           "hypernetwork and of the embedding, each separately; 0 = off", min=0)
    hypernet_bias: bool = opt(True, "hyperfl: the hypernetwork's output layers have biases "
                              "(official); false: without, so that the upload carries no "
                              "generated tensor's gradient as such (docs/attacks.md)")
    fedavg_init: str = opt("own", "fedavg: own (the model's init) or hyperfl (the extractor "
                           "HyperFL's hypernetwork generates for a client before training, and "
                           "HyperFL's head: the weight-scale control of docs/privacy-verdict.md)",
                           choices=("own", "hyperfl"))


@dataclass
class PrivacyConfig:
    sample_clip: float = opt(0.04, "dpfedavg, ppsgd, centaur: DP-SGD's bound C on each "
                             "sample's gradient norm (official 0.04)", min=0, min_exclusive=True)
    dp_epsilon: float = opt(4.0, "dpfedavg, ppsgd, centaur: target epsilon after all rounds; "
                            "the noise multiplier is calibrated to it (official 4)", min=0,
                            min_exclusive=True)
    dp_delta: float = opt(1e-5, "dpfedavg, ppsgd, centaur: target delta (official 1e-5)", min=0,
                          max=1, min_exclusive=True)
    defense: str = opt("none", "a transform of every client's upload before the round's sum "
                       "(and before any attack sees it): dp_gaussian / dp_laplace (clip to "
                       "privacy.update_clip, add noise of scale privacy.noise), topk (keep "
                       "privacy.topk_ratio of each tensor), soteria (prune "
                       "privacy.soteria_rate percent of the representation layer), random_slice "
                       "(GradDefense: noise on random sensitivity-balanced slices, the server "
                       "denoises; needs data.public_fraction for its root set), "
                       "gradienthide (one more SGD step on labelled public images before the "
                       "upload; needs data.public_fraction); or a user's own: module:Class, a "
                       "subclass of hpcfl.privacy.defenses.Defense (docs/extending.md)",
                       plugin=True)
    update_clip: float = opt(4.0, "dp_gaussian, dp_laplace: L2 bound of the whole update; 0 = "
                             "no clip (GIFD's default 4)", min=0)
    noise: float = opt(0.01, "dp_gaussian: noise std; dp_laplace: Laplace scale; absolute, per "
                       "entry (GIFD's default 0.01)", min=0)
    topk_ratio: float = opt(0.03, "topk: share of each tensor's entries kept, the largest in "
                            "magnitude (IG on digits lost 1.4 dB of PSNR at 0.1, 3.2 dB at 0.03: "
                            "docs/defenses.md)", min=0,
                            max=1, min_exclusive=True)
    slices: int = opt(10, "random_slice: slices of the upload (official 10)", min=1)
    slices_perturbed: int = opt(5, "random_slice: slices perturbed per client and round "
                                "(official 5)", min=1)
    slice_noise: float = opt(5e-4, "random_slice: noise std on the perturbed slices (official "
                             "5e-4)", min=0)
    slice_sample_clip: float = opt(0.0, "random_slice: at every local step, each sample's "
                                   "gradient on each perturbed slice clipped to this L2 norm "
                                   "(GradDefense's optional clip.py, whose bound is the noise "
                                   "std); 0 = off", min=0)
    compensate: bool = opt(True, "random_slice: the server denoises the aggregate (GradDefense's "
                           "global compensation)")
    hide_batch: int = opt(32, "gradienthide: public images in the extra step", min=1)
    hide_labeler: str = opt("auto", "gradienthide: who labels the public images: clip (CLIP "
                            "zero-shot through open_clip, weights already on this machine), "
                            "public_model (the run's model trained on the public split), auto "
                            "(clip when open_clip, its weights and the dataset's class names are "
                            "here, else public_model)", choices=("auto", "clip", "public_model"))
    labeler_model: str = opt("ViT-B-32", "gradienthide's CLIP labeler: an open_clip model name, "
                             "or local-dir:PATH (a folder with open_clip_config.json and "
                             "weights)")
    labeler_weights: str = opt("openai", "gradienthide's CLIP weights: an open_clip pretrained "
                               "tag, looked up in the local Hugging Face cache (never "
                               "downloaded), or a file; ignored with local-dir:")
    soteria_rate: float = opt(60.0, "soteria: percent of representation units whose column of "
                              "the layer's update is zeroed (Soteria's GS-attack default 60)",
                              min=0, max=100)


@dataclass
class TrainConfig:
    rounds: int = opt(30, "communication rounds", min=1)
    local_epochs: int = opt(5, "local epochs per round (ignored when local_steps > 0)", min=1)
    local_steps: int = opt(0, "local SGD steps per round instead of epochs; 0 = use epochs", min=0)
    batch_size: int = opt(50, "local minibatch size", min=1)
    lr: float = opt(0.05, "client learning rate (hyperfl: hypernetwork + embedding; the paper's "
                    "CNN runs use 0.02)", min=0, min_exclusive=True)
    momentum: float = opt(0.5, "SGD momentum (reset every round, as the official code)", min=0,
                          max=1)
    weight_decay: float = opt(5e-4, "SGD weight decay", min=0)
    frac: float = opt(1.0, "fraction of clients sampled each round", min=0, max=1,
                      min_exclusive=True)
    seed: int = opt(0, "seed of partition, cohorts, init and batch order", min=0)
    eval_every: int = opt(1, "evaluate every k rounds (and after the last)", min=1)
    eval_clients: str = opt("auto", "which clients an evaluation covers: all; K (a number: a "
                            "fixed sample of K clients drawn from the seed, the same every "
                            "evaluation); auto (all up to 1000 clients, else a sample of 1000)")
    device: str = opt("auto", "auto (cuda if present, else cpu), cpu, cuda or cuda:N")
    collective_timeout_s: float = opt(0.0, "the watchdog: seconds the round's Allreduce may "
                                      "wait before every rank is stopped (exit code 4) with "
                                      "one line naming the round and the ranks not heard from, "
                                      "the run resumable from its last checkpoint, rather than "
                                      "hang on a dead node or a cut link until the job's time "
                                      "limit; more than the slowest rank's lag in a round; 0 = "
                                      "off", min=0)


@dataclass
class EngineConfig:
    mode: str = opt("auto", "how a rank trains its clients: sequential (one after another), "
                    "vectorized (many at once with torch.func.vmap), auto (a fixed choice per "
                    "device type: sequential on cpu, the faster there in python -m hpcfl.bench "
                    "digits-hyperfl; vectorized on cuda, not yet measured)",
                    choices=("auto", "sequential", "vectorized"))
    stack_size: int = opt(0, "the round's cohort, sorted, is cut into stacks of at most this "
                          "many clients, dealt to the ranks to balance them, that train "
                          "together (vectorized: one vmap; sequential: one after another) and "
                          "sum their hypernetwork uploads as one product; the cut depends on "
                          "the cohort alone, so the results do not depend on the rank count, "
                          "but they do on this value (last bits); 0 = auto: the cohort in 16 "
                          "stacks (sequential: at least 16, of at most 8 clients)", min=0)
    dtype: str = opt("fp32", "arithmetic of local training: fp32, tf32 (CUDA), bf16 "
                     "(autocast, for GPUs); evaluation stays fp32; bit-for-bit "
                     "reproducibility holds within one setting",
                     choices=DTYPES)
    threads: int = opt(1, "CPU threads per rank (torch intra-op); fixed, because the thread "
                       "count changes a run's last bits, which HyperFL amplifies; 0 = "
                       "SLURM_CPUS_PER_TASK, else the node's cores shared among its ranks "
                       "(faster on CPU, but results then depend on the rank count)", min=0)
    compile: bool = opt(False, "torch.compile the local step (forward and backward; CUDA graphs "
                        "on CUDA): faster steps after a compile of seconds to a minute per "
                        "phase; the last bits differ from engine.compile=false")


# Keys a resumed run may change (section.* : all of its keys): how long it goes on, how often it
# evaluates, where and how it computes and writes, what an attack of it does. Any other change
# makes it another experiment. Not a DP baseline's train.rounds: its noise is calibrated to them.
RESUMABLE = ("train.rounds", "train.eval_every", "train.device", "train.collective_timeout_s",
             "engine.*", "output.*", "attack.*")


@dataclass
class OutputConfig:
    dir: str = opt("runs", "directory of results files")
    name: str = opt("", "results file is <dir>/<name>.h5; empty = <algorithm>-<data>-<8 hex "
                    "digits of the config but its output and attack sections>: one name per "
                    "experiment, so that python -m hpcfl.attack and hpcfl.main of one config "
                    "share a file, a requeued job resumes its run, two runs of other configs "
                    "never share one, and a rerun of a completed one reports it done")
    overwrite: bool = opt(False, "start over, replacing an existing results file and checkpoint "
                          "of the same name")
    checkpoint_every: int = opt(10, "write <name>.ckpt.h5 every k rounds (also after the last "
                                "round and on SIGTERM/SIGUSR1/SIGUSR2); 0 = only then", min=0)
    resume: str = opt("auto", "auto: go on from <name>.ckpt.h5 if it exists; never: start "
                      "fresh; must: fail unless there is a checkpoint. A resumed run may change "
                      f"{', '.join(RESUMABLE)} (not a DP baseline's train.rounds); any other "
                      "change of the config is refused", choices=("auto", "never", "must"))
    progress: str = opt("auto", "progress display: bar (tqdm), log (a line per evaluation), "
                        "none, or auto (bar on a terminal, else log)",
                        choices=("auto", "bar", "log", "none"))


@dataclass
class AttackConfig:
    name: str = opt("ig", "python -m hpcfl.attack: ig (Inverting Gradients), dlg, idlg (iDLG's "
                    "label, then IG for the image), gifd (a GAN prior: attack.generator), or a "
                    "user's own: module:Class, a subclass of hpcfl.privacy.attacks.Attack "
                    "(docs/extending.md)", choices=("ig", "dlg", "idlg", "gifd"), plugin=True)
    round: int = opt(1, "attack the uploads of this round (the run is trained to the round "
                     "before it)", min=1)
    clients: int = opt(1, "attack the first this-many clients of the round's cohort", min=1)
    iterations: int = opt(4800, "optimizer iterations per restart", min=1)
    restarts: int = opt(1, "random restarts; the lowest-loss reconstruction is kept", min=1)
    threat: str = opt("server", "server: knows the shared state, not a client's private state "
                      "(HyperFL: embedding and head), which it optimizes too; white-box: knows it",
                      choices=("server", "white-box"))
    tv: float = opt(1e-4, "ig, gifd: weight of total variation", min=0)
    lr: float = opt(0.1, "ig, gifd: Adam step size; dlg: L-BFGS step size", min=0,
                    min_exclusive=True)
    generator: str = opt("", "gifd: the generator file (python -m "
                         "hpcfl.privacy.train_generator)")
    radius: float = opt(0.1, "gifd: stage k's features move by at most radius * k of their "
                        "l1 norm", min=0, min_exclusive=True)
    mute_defended_layer: bool = opt(False, "leave the layer privacy.defense=soteria prunes "
                                    "out of the matching loss (the attack that breaks Soteria)")
    multi_step: bool = opt(True, "match the whole local update by simulating the client's local "
                           "training; false: the single-gradient shortcut (update / lr)")
    unknowns_lr: float = opt(1e-3, "Adam step size of the tensors the server does not know "
                             "(HyperFL's embedding and head under the server threat); 0: frozen "
                             "where the upload or the public init put them", min=0)
    unknowns_schedule: str = opt("constant", "the unknowns' step size over the iterations: "
                                 "constant, or images (the images' schedule)",
                                 choices=("constant", "images"))
    analytic: bool = opt(True, "use what one step's upload gives in closed form: the input of "
                         "the first Linear layer (its features; with several images, the space "
                         "they lie in) as a term of the loss, and a single image's label")
    feature_weight: float = opt(1.0, "weight of the analytic feature term in the loss", min=0)
    basin: float = opt(0.0, "ig: > 0: the basin test: start from the true images plus Gaussian "
                       "noise of this std (pixels in [0, 1]) instead of random images", min=0)
    adaptive: bool = opt(True, "use what the upload's structure gives away before optimizing "
                         "(hyperfl, hyperfl_lpm: recover the client's generated extractor from "
                         "the hypernetwork's update, then invert that extractor); false: the "
                         "generic attack through the whole shared model")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _sections(cfg: RunConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _fields(section) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


def _unknown(kind: str, name: str, known) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown {kind} '{name}'{hint}; known: {', '.join(known)}")


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Check a YAML-parsed value against the field's type (ints are accepted as floats)."""
    want = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                   "bool": bool}[f.type]
    ok = (isinstance(value, want) and not (want is int and isinstance(value, bool))) or (
        want is float and isinstance(value, int) and not isinstance(value, bool))
    if want is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            value, ok = float(value), True
        except ValueError:
            pass
    if want is str and isinstance(value, (int, float)):  # YAML's true/1 for a string key
        value, ok = (str(value).lower() if isinstance(value, bool) else str(value)), True
    if not ok:
        raise ConfigError(f"{key}: expected {want.__name__}, got {value!r}")
    if want is not float:
        return value
    try:
        value = float(value)
    except OverflowError:  # an int of 400 digits
        value = math.inf
    # NaN passes every range check (all its comparisons are false), and no option means
    # anything at inf: both are typing mistakes, to stop here rather than diverge a run later.
    if not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    return value


def _check(key: str, f: dataclasses.Field, value: Any) -> None:
    m = f.metadata
    if m["plugin"] and ":" in value:
        if not is_plugin(value):
            raise ConfigError(f"{key}: {value!r} is not module:Class (a user's own class)")
        return  # imported by validate (a stored config is read where its module may not be)
    if m["choices"] and value not in m["choices"]:
        mine = " or module:Class" if m["plugin"] else ""
        raise ConfigError(f"{key}: {value!r} is not one of "
                          f"{', '.join(map(str, m['choices']))}{mine}")
    lo, hi = m["min"], m["max"]
    above = f"{'<' if m['max_exclusive'] else '<='} {hi}"
    if lo is not None and (value < lo or (m["min_exclusive"] and value == lo)):
        rel = ">" if m["min_exclusive"] else ">="
        raise ConfigError(f"{key}: {value!r} is out of range; must be {rel} {lo}"
                          + (f" and {above}" if hi is not None else ""))
    if hi is not None and (value > hi or (m["max_exclusive"] and value == hi)):
        raise ConfigError(f"{key}: {value!r} is out of range; must be {above}")


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    """Set `section.field` (or its old name, RENAMED) to an already-parsed value, with type and
    range checks."""
    key = RENAMED.get(key, key)
    parts = key.split(".")
    sections = _sections(cfg)
    if len(parts) != 2:
        raise ConfigError(f"bad key '{key}': keys look like section.field, sections: "
                          f"{', '.join(sections)}")
    sec_name, name = parts
    if sec_name not in sections:
        raise _unknown("section", sec_name, list(sections))
    section = sections[sec_name]
    fields = _fields(section)
    if name not in fields:
        raise _unknown("key", key, [f"{sec_name}.{n}" for n in fields])
    value = _coerce(key, fields[name], value)
    _check(key, fields[name], value)
    setattr(section, name, value)


# Old names still read (configs, results files and command lines of earlier versions).
RENAMED = {"engine.max_clients_in_memory": "engine.stack_size",
           "engine.group_size": "engine.stack_size",
           "engine.block_size": "engine.stack_size",
           "algorithm.clip_norm": "algorithm.grad_clip",
           "privacy.dp_clip": "privacy.sample_clip",
           "privacy.clip": "privacy.update_clip",
           "privacy.slice_clip": "privacy.slice_sample_clip",
           "privacy.clip_model": "privacy.labeler_model",
           "privacy.clip_weights": "privacy.labeler_weights"}


def apply_dict(cfg: RunConfig, tree: Any, source: str) -> None:
    if tree is None:
        return
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    for sec_name, body in tree.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section '{sec_name}' must be a mapping of keys")
        for name, value in body.items():
            set_value(cfg, f"{sec_name}.{name}", value)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"bad argument '{text}': expected CONFIG.yaml or key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_user_file(path: str, what: str) -> str:
    """The text of a file the user named (`what`: "config file", "sweep file"): one line
    naming it when it is missing, a folder, unreadable or not UTF-8, the only place such a file
    is read."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a file")
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at "
                          f"offset {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot be read ({one_line(e)})") from None


def load_yaml(path: str, what: str) -> Any:
    """A user's YAML file (a config, a sweep), parsed: one line when it is not YAML, or when it
    holds nothing (empty, or only comments: a file named on purpose that sets nothing is a
    wrong or truncated file, not a wish for the defaults, which need no file)."""
    text = read_user_file(path, what)
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(e, "problem", None) or one_line(e)
        raise ConfigError(f"{path}: not valid YAML ({why}{where})") from None
    if tree is None:
        raise ConfigError(f"{what} {path} is empty: it sets nothing")
    return tree


def load_config(path: str | None = None, overrides: list[str] = (),
                base_yaml: str | None = None) -> RunConfig:
    """Defaults <- base_yaml (e.g. from a results file) <- YAML file <- key=value overrides."""
    cfg = RunConfig() if base_yaml is None else parse_stored(base_yaml, "the results file")
    if path is not None:
        apply_dict(cfg, load_yaml(path, "config file"), path)
    for text in overrides:
        set_value(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that involve more than one field (single fields are checked when set)."""
    # Checks that need the dataset (class count, sizes) are made where it is loaded.
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"train.device: {dev!r} is not one of auto, cpu, cuda, cuda:N")
    for key, value in (("algorithm.name", cfg.algorithm.name),
                       ("privacy.defense", cfg.privacy.defense), ("attack.name", cfg.attack.name)):
        if is_plugin(value):  # there and a class; its registry's room checks its base class
            load_class(key, value, object)
    alg, model = cfg.algorithm.name, cfg.model.name
    if (alg in LPM_ALGORITHMS and model not in LPM_MODELS) or (
            model in LPM_MODELS and alg not in (*LPM_ALGORITHMS, "fedavg", "local")
            and not is_plugin(alg)):
        raise ConfigError(f"algorithm.name={alg} with model.name={model}: "
                          f"{', '.join(LPM_ALGORITHMS)} go with model.name "
                          f"{' or '.join(LPM_MODELS)}, and those models with them or with "
                          "fedavg / local (the linear probe)")
    ev = cfg.train.eval_clients
    if ev not in ("auto", "all") and not (ev.isdigit() and int(ev) > 0):
        raise ConfigError(f"train.eval_clients: {ev!r} is not all, auto or a number of clients")
    name = cfg.output.name
    if name and (any(c in name for c in "/\\") or name.startswith(".")):
        raise ConfigError(f"output.name: {name!r} must be a plain file name without '/'")


def parse_stored(text: str, where) -> RunConfig:
    """The config a file stores (YAML), in today's types and names, unchecked beyond its keys
    and values: a stored module:Class is not imported (the reader may not have it)."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"config stored in {where}: not valid YAML") from None
    cfg = RunConfig()
    apply_dict(cfg, tree, f"config stored in {where}")
    return cfg


def describe() -> str:
    """Every key with its default and help, for --help."""
    lines = []
    for sec_name, section in _sections(RunConfig()).items():
        for name, f in _fields(section).items():
            m = f.metadata
            extra = f" [{'|'.join(map(str, m['choices']))}]" if m["choices"] else ""
            lines.append(f"  {sec_name}.{name} = {getattr(section, name)!r}{extra}\n"
                         f"      {m['help']}")
    return "\n".join(lines)

"""`python -m hpcfl.privacy.train_generator [CONFIG.yaml] [data.key=value ...] --out FILE`:
train the GAN prior of `attack.name=gifd` on a dataset's public split.

The public split is data.public_fraction of the training split, held out from every client of
a run with the same data keys and train.seed, so the generator never sees a victim's image.
Hinge loss, Adam(2e-4, betas (0, 0.9)) for both networks, spectral norm in the discriminator.
The file (torch.save, loadable with weights_only) holds the generator and a record of its
training; it is written to a temporary name and renamed, so a stopped run leaves none.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import __version__
from ..config import ConfigError, load_config
from ..data import load_public
from ..world import World
from .generator import Discriminator, Generator


@dataclass(frozen=True)
class Training:
    """How the generator is trained: Adam steps, batch, latent size, width, seed."""
    steps: int
    batch: int
    latent: int
    width: int
    seed: int


def train(x: torch.Tensor, y: torch.Tensor, num_classes: int, how: Training,
          progress: bool = False) -> tuple[Generator, list[float]]:
    """A generator of images like x (pixels in [0, 1], NCHW) for labels y; returns it in eval
    mode and the discriminator's hinge loss every 100 steps."""
    steps, batch, latent, width = how.steps, how.batch, how.latent, how.width
    torch.manual_seed(how.seed)
    dev = x.device
    gen = Generator(tuple(x.shape[1:]), num_classes, latent, width).to(dev)
    disc = Discriminator(tuple(x.shape[1:]), num_classes, width).to(dev)
    opt_g = torch.optim.Adam(gen.parameters(), 2e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), 2e-4, betas=(0.0, 0.9))
    real_all = x.float() * 2 - 1
    losses = []
    for step in tqdm(range(steps), disable=not progress, unit="step"):
        idx = torch.randint(len(real_all), (batch,), device=dev)
        real, labels = real_all[idx], y[idx]
        z = torch.randn(batch, latent, device=dev)
        fake = gen(z, F.one_hot(labels, num_classes).float())
        d_loss = (F.relu(1 - disc(real, labels)).mean()
                  + F.relu(1 + disc(fake.detach(), labels)).mean())
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = -disc(fake, labels).mean()
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        if step % 100 == 0:
            losses.append(d_loss.item())
    return gen.eval().requires_grad_(False), losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcfl.privacy.train_generator",
                                description=__doc__.split("\n\n")[1])
    p.add_argument("config", nargs="*", help="CONFIG.yaml and/or data.key=value overrides "
                   "(data.name, data.root, data.public_fraction, train.seed, train.device)")
    p.add_argument("--out", required=True, help="the generator file to write")
    p.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--latent", type=int, default=64, help="latent size (default 64)")
    p.add_argument("--width", type=int, default=32, help="channels at full resolution, doubled "
                   "at each halving down to 4x4 (default 32)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    path = next((a for a in args.config if "=" not in a), None)
    try:
        if min(args.steps, args.batch, args.latent, args.width) < 1:
            raise ConfigError("--steps, --batch, --latent and --width must be positive")
        cfg = load_config(path, [a for a in args.config if a != path])
        device = World(cfg.train.device).device
        x, y, _, _, num_classes = load_public(cfg.data, cfg.train.seed, device)
        if x.shape[-1] & (x.shape[-1] - 1) or x.shape[-1] < 8:
            raise ConfigError(f"data.name={cfg.data.name}: the generator makes 8, 16, 32... "
                              f"pixel images, not {x.shape[-1]}")
    except ConfigError as e:
        print(f"hpcfl.privacy.train_generator: error: {e}", file=sys.stderr)
        return 2
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    t0 = time.perf_counter()
    how = Training(args.steps, args.batch, args.latent, args.width, cfg.train.seed)
    gen, losses = train(x, y, num_classes, how, progress=sys.stderr.isatty())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(data=cfg.data.name, public_fraction=cfg.data.public_fraction,
                  seed=cfg.train.seed, public_images=len(y), steps=args.steps,
                  batch=args.batch, d_loss=losses, seconds=time.perf_counter() - t0,
                  hpcfl_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = out.with_name(out.name + ".tmp")
    torch.save(dict(spec=gen.spec(), state=gen.state_dict(), record=record), tmp)
    os.replace(tmp, out)
    print(f"generator for {cfg.data.name} trained on {len(y)} public images, {args.steps} "
          f"steps in {record['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m hpcfl.data.prepare NAME --source DIR [--out FILE] [--download]`

Turns a dataset's distributed files into one HDF5 file that runs read (format: data/files.py).
DIR is what one passes as `root` to torchvision (the official code's `data/`):

    mnist    DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    fmnist   DIR/FashionMNIST/raw/  (same names)
    emnist   DIR/EMNIST/raw/emnist-byclass-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]
    cifar10  DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    cinic10  DIR/CINIC-10/{train,test}/<class>/*.png   (valid/ is not used, as officially)

CIFAR's pickles are read with an unpickler that admits only what they contain (builtins and
numpy array reconstruction). --download lets torchvision fetch mnist, fmnist, emnist and cifar10
into DIR first, where a network exists. The output is written to a temporary file and renamed,
so an interrupted run leaves no file that looks prepared.
"""
from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import pickle
import string
import struct
import sys
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..config import ArgumentParser, ConfigError
from ..oneline import one_line
from .files import FILE_DATASETS, FORMAT, FORMAT_VERSION


class PrepareError(Exception):
    """A missing, truncated or foreign source file: one line, exit code 2."""


IDX_DIRS = {"mnist": "MNIST", "fmnist": "FashionMNIST", "emnist": "EMNIST"}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]
CLASSES = {"mnist": [str(d) for d in range(10)], "fmnist": FMNIST_CLASSES,
           "emnist": sorted(string.digits + string.ascii_letters)}  # torchvision's byclass order


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find(path: Path) -> Path:
    """`path` or `path.gz`, whichever exists."""
    for p in (path, path.with_name(path.name + ".gz")):
        if p.is_file():
            return p
        if p.is_dir():
            raise PrepareError(f"{p} is a directory, not a file")
    raise PrepareError(f"{path}[.gz] not found")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (LeCun's MNIST format: big-endian header, uint8 data), gzipped or not."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise PrepareError(f"{path}: cannot be read ({e})") from None
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\0\0\x08" or raw[3] != ndim:
        raise PrepareError(f"{path}: not an idx file of {ndim}-d uint8 data")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise PrepareError(f"{path}: truncated or damaged: {body.size} bytes of data, its header "
                           f"promises {int(np.prod(dims))}")
    return body.reshape(dims)


def load_idx(name: str, source: Path) -> dict:
    raw = source / IDX_DIRS[name] / "raw"
    prefix = {"train": "emnist-byclass-train-", "test": "emnist-byclass-test-"} \
        if name == "emnist" else {"train": "train-", "test": "t10k-"}
    out = {"classes": CLASSES[name], "sources": []}
    for split, pre in prefix.items():
        images = find(raw / f"{pre}images-idx3-ubyte")
        labels = find(raw / f"{pre}labels-idx1-ubyte")
        x, y = read_idx(images, 3), read_idx(labels, 1)
        if len(x) != len(y):
            raise PrepareError(f"{images}: {len(x)} images but {labels} has {len(y)} labels")
        # Kept as stored: torchvision (and so the official code) does not transpose EMNIST.
        out[split] = (x[:, None], y.astype(np.int64))
        out["sources"] += [images, labels]
    return out


class ArraysOnly(pickle.Unpickler):
    """Admits only what CIFAR's pickles contain: builtins and numpy array reconstruction."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused: it asks for {module}.{name}, which a CIFAR "
                                         "batch never contains")
        return super().find_class(module, name)


def unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, OSError) as e:
        raise PrepareError(f"{path}: not a CIFAR python batch ({e})") from None
    if not isinstance(d, dict):
        raise PrepareError(f"{path}: not a CIFAR python batch (a {type(d).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar10(source: Path) -> dict:
    root = source / "cifar-10-batches-py"
    meta = unpickle(find(root / "batches.meta"))
    try:
        classes = [c.decode() if isinstance(c, bytes) else c for c in meta.get("label_names", [])]
    except (UnicodeDecodeError, TypeError) as e:
        raise PrepareError(f"{root / 'batches.meta'}: label_names are not UTF-8 text ({e})") \
            from None
    out = {"classes": classes, "sources": [root / "batches.meta"]}
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                         ("test", ["test_batch"])):
        xs, ys = [], []
        for name in files:
            path = find(root / name)
            d = unpickle(path)
            try:
                x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(d["labels"], dtype=np.int64)
            except (KeyError, ValueError) as e:
                raise PrepareError(f"{path}: not a CIFAR python batch ({e!r})") from None
            if len(x) != len(y):
                raise PrepareError(f"{path}: {len(x)} images but {len(y)} labels")
            xs.append(x), ys.append(y), out["sources"].append(path)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    if len(out["classes"]) != 10:
        raise PrepareError(f"{root / 'batches.meta'}: expected 10 label_names")
    return out


def load_cinic10(source: Path) -> dict:
    """The ImageFolder layout, read as torchvision's ImageFolder does: classes are the sorted
    folder names, files sorted within each, every image converted to RGB."""
    from PIL import Image
    from tqdm import tqdm

    root = source / "CINIC-10"
    out = {"sources": []}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise PrepareError(f"{folder} not found")
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if out.setdefault("classes", classes) != classes or len(classes) != 10:
            raise PrepareError(f"{folder}: expected the same 10 class folders in train and test, "
                               f"found {classes}")
        files = [(p, y) for y, c in enumerate(classes) for p in sorted((folder / c).glob("*.png"))]
        if not files:
            raise PrepareError(f"{folder}: no PNG files")
        x = np.empty((len(files), 3, 32, 32), dtype=np.uint8)
        for i, (p, _) in enumerate(tqdm(files, desc=f"CINIC-10 {split}", unit="img",
                                        disable=len(files) < 10000)):
            try:
                with Image.open(p) as im:
                    img = np.asarray(im.convert("RGB"))
            except OSError as e:
                raise PrepareError(f"{p}: not a readable PNG ({e})") from None
            if img.shape != (32, 32, 3):
                raise PrepareError(f"{p}: {img.shape[1]}x{img.shape[0]} pixels, CINIC-10 is 32x32")
            x[i] = img.transpose(2, 0, 1)
        out[split] = (x, np.array([y for _, y in files], dtype=np.int64))
        out["sources"] += [p for p, _ in files]
    return out


LOADERS = {"mnist": load_idx, "fmnist": load_idx, "emnist": load_idx,
           "cifar10": lambda _, s: load_cifar10(s), "cinic10": lambda _, s: load_cinic10(s)}


def download(name: str, source: Path) -> None:
    """Let torchvision fetch the files into `source` (needs a network; untested here)."""
    from torchvision import datasets

    if name == "cinic10":
        raise PrepareError("cinic10 has no torchvision downloader: unpack CINIC-10.tar.gz into "
                           f"{source / 'CINIC-10'}")
    for train in (True, False):
        if name == "emnist":
            datasets.EMNIST(str(source), "byclass", train=train, download=True)
        else:
            cls = {"mnist": datasets.MNIST, "fmnist": datasets.FashionMNIST,
                   "cifar10": datasets.CIFAR10}[name]
            cls(str(source), train=train, download=True)


def source_digests(sources: list[Path], source: Path) -> dict[str, str]:
    """sha256 per source file; for thousands of files (CINIC-10's PNGs) one digest of the sorted
    list of (path, sha256), since HDF5 attributes are small."""
    digests = {str(p.relative_to(source)): sha256(p) for p in sources}
    if len(digests) <= 100:
        return digests
    manifest = "\n".join(f"{k} {v}" for k, v in sorted(digests.items()))
    return {f"{len(digests)} files (sha256 of their 'path sha256' lines)":
            hashlib.sha256(manifest.encode()).hexdigest()}


def prepare(name: str, source: Path, out: Path, command: str) -> Path:
    spec = FILE_DATASETS[name]
    if not source.is_dir():
        raise PrepareError(f"--source {source}: " + ("not a directory" if source.exists() else
                                                     "no such directory"))
    # found before the reading, not by the writing at the end
    if out.is_dir():
        raise PrepareError(f"--out {out} is a directory; name the file to write")
    below = next((q for q in out.parents if q.is_file()), None)
    if below is not None:
        raise PrepareError(f"--out {out}: {below} is a file, not a folder")
    data = LOADERS[name](name, source)
    for split in ("train", "test"):
        x, y = data[split]
        if x.shape[1:] != spec.shape:
            raise PrepareError(f"{name} {split}: images of shape {x.shape[1:]}, expected "
                               f"{spec.shape}")
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise PrepareError(f"{name} {split}: labels outside 0..{spec.num_classes - 1}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as f:
            for split in ("train", "test"):
                f[f"{split}/images"], f[f"{split}/labels"] = data[split]
            f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, name=name,
                           classes=json.dumps(data["classes"]),
                           sources=json.dumps(source_digests(data["sources"], source)),
                           command=command, hpcfl_version=__version__,
                           created=dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        os.replace(tmp, out)
    except OSError as e:  # a folder that cannot be made or written
        raise PrepareError(f"--out {out}: cannot be written ({one_line(e)})") from None
    finally:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m hpcfl.data.prepare",
                                description="Write a dataset's distributed files into the HDF5 "
                                "file that runs read (<data.root>/<name>.h5).")
    p.add_argument("name", choices=sorted(FILE_DATASETS))
    p.add_argument("--source", required=True, type=Path,
                   help="the directory one passes as root to torchvision (e.g. data/)")
    p.add_argument("--out", type=Path, help="output file (default data/<name>.h5, the default "
                   "data.root)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download the files into --source first (needs network)")
    try:
        a = p.parse_args(argv)
    except ConfigError as e:
        print(f"hpcfl.data.prepare: error: {e}", file=sys.stderr)
        return 2
    out = a.out or Path("data") / f"{a.name}.h5"
    command = " ".join(["python -m hpcfl.data.prepare", *(sys.argv[1:] if argv is None else argv)])
    try:
        if a.download:
            download(a.name, a.source)
        path = prepare(a.name, a.source, out, command)
    except PrepareError as e:
        print(f"hpcfl.data.prepare: error: {e}", file=sys.stderr)
        return 2
    with h5py.File(path, "r") as f:
        sizes = ", ".join(f"{s} {len(f[s]['labels'])}" for s in ("train", "test"))
    print(f"{a.name}: {sizes} images -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

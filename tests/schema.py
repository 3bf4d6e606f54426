"""What docs/results-schema.md must name: every group, dataset and attribute found in a file hpcfl
wrote, the parts of a path that a run chooses (an attack's name, a bench cell, a tensor) written
as the page's placeholders, against the rows of the page's tables in the section of that file."""
from __future__ import annotations

import re
from pathlib import Path

import h5py

PAGE = Path(__file__).resolve().parent.parent / "docs" / "results-schema.md"

# kind of file -> (its section's heading on the page, {group: placeholder of its children})
KINDS = {
    "results": ("Results file", {"/privacy": "<name>"}),
    "checkpoint": ("Checkpoint", {"/shared": "<name>", "/private": "<name>"}),
    "bench": ("Bench file", {"/bench": "<cell>"}),
    "suite": ("Bench suite file", {"/cells": "<workload>", "/cells/<workload>": "<cell>",
                                   "/scaling": "<ranks>"}),
    "prepared": ("Prepared dataset file", {}),
}


def as_documented(name: str, variable: dict[str, str]) -> str:
    """An HDF5 path with the names a run chooses replaced: privacy/ig/psnr ->
    /privacy/<name>/psnr."""
    path = ""
    for part in name.strip("/").split("/"):
        path += "/" + variable.get(path, part)
    return path or "/"


def contents(path: Path, kind: str) -> tuple[set[str], set[tuple[str, str]]]:
    """The file's objects and its (object, attribute) pairs, as the page writes them."""
    variable = KINDS[kind][1]
    with h5py.File(path, "r") as f:
        objects, attrs = set(), {("/", a) for a in f.attrs}

        def visit(name, obj):
            p = as_documented(name, variable)
            objects.add(p)
            attrs.update((p, a) for a in obj.attrs)
        f.visititems(visit)
    return objects, attrs


def documented(kind: str) -> tuple[set[str], set[tuple[str, str]]]:
    """The objects (a row `| \\`/path\\` | ...`) and attributes (a row `| \\`/path\\` |
    \\`attr\\` | ...`) the page's section of this kind of file lists."""
    heading = f"## {KINDS[kind][0]}\n"
    text = PAGE.read_text()
    assert heading in text, f"{PAGE} has no section '{heading.strip()}'"
    objects, attrs = set(), set()
    for line in text.split(heading, 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        first = re.fullmatch(r"`([^`]+)`", cells[0])
        if not line.startswith("|") or first is None:
            continue
        objects.add(first[1])
        second = re.fullmatch(r"`([^`]+)`", cells[1]) if len(cells) > 1 else None
        if second:
            attrs.add((first[1], second[1]))
    return objects, attrs


def undocumented(path: Path, kind: str) -> list[str]:
    """Every object and attribute of the file that the page's section of its kind lacks."""
    objects, attrs = contents(path, kind)
    known_objects, known_attrs = documented(kind)
    return ([f"{o}" for o in sorted(objects - known_objects)] +
            [f"attribute {a} of {o}" for o, a in sorted(attrs - known_attrs)])


def assert_documented(path: Path, kind: str) -> None:
    missing = undocumented(path, kind)
    assert not missing, (f"{PAGE.name}, section '{KINDS[kind][0]}', does not list what "
                         f"{Path(path).name} holds; add a row for each of: "
                         + "; ".join(missing))

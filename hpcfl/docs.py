"""`python -m hpcfl.docs > docs/configuration.md`: the configuration page, generated from the
config dataclasses (hpcfl.config), so that the page cannot say other than the code does.
tests/test_docs.py regenerates it in-process and fails when docs/configuration.md differs.
"""
from __future__ import annotations

import dataclasses
import sys

from .config import RENAMED, RunConfig

COMMAND = "python -m hpcfl.docs > docs/configuration.md"

# One line per section of RunConfig: what the section is for (a section without one is
# listed all the same).
SECTIONS = {
    "data": "the dataset and how it is spread over clients ([data.md](data.md))",
    "model": "the network ([methods.md](methods.md))",
    "algorithm": "the federated method and its own settings ([methods.md](methods.md))",
    "train": "rounds, local training, seed, evaluation, device",
    "privacy": "the DP-SGD baselines' budget and the defenses "
               "([defenses.md](defenses.md))",
    "attack": "`python -m hpcfl.attack` only ([attacks.md](attacks.md))",
    "engine": "how a rank trains its clients: these keys change speed and rounding, not the "
              "method ([performance.md](performance.md))",
    "output": "where results go, checkpoints, resume ([cluster.md](cluster.md))",
}

INTRO = f"""# Configuration

<!-- Generated from hpcfl/config.py by `{COMMAND}`;
     do not edit by hand: tests/test_docs.py fails when this page and the code differ. -->

Every option of a run, with its default, the values it allows and what it does, as the code
defines them (`hpcfl/config.py`; `python -m hpcfl.main --help` prints the same).

A run is configured by, in this order, each overriding the one before:

1. the defaults below;
2. `--from RESULTS.h5`: the config stored in a results file (`python -m hpcfl.main` only);
3. a YAML file whose sections are the headings below (`jobs/quickstart.yaml` is the default
   run spelled out);
4. `section.key=value` arguments on the command line (values are read as YAML: `1e-3`,
   `true`, `[1, 2]`).

```bash
python -m hpcfl.main jobs/quickstart.yaml train.rounds=50 output.name=long
```

Every value is checked before any work: an unknown section or key (with the closest known
one), a wrong type, NaN or inf, or a value outside its range stops the command with one line
naming the key and what is allowed, exit code 2, and no results file. `python -m hpcfl.attack`,
`python -m hpcfl.sweep` and `python -m hpcfl.bench` take the same keys.
"""

OUTRO = """## Checks across keys

Made when the whole config is known (single keys are checked when they are set):

- `train.device` is `auto`, `cpu`, `cuda` or `cuda:N`.
- `algorithm.name` `hyperfl_lpm`, `fedavg_adapter` and `local_adapter` need `model.name`
  `vit_adapter` or `resnet18_adapter`, and those models go only with them or with `fedavg` /
  `local` (the linear probe).
- `train.eval_clients` is `all`, `auto` or a positive number.
- `output.name` is a plain file name (no `/`, not starting with `.`).
- Checks that need the data (class counts, sizes, memory), a device or a file are made when
  they are loaded, before the results file is created, with the same one line and exit code 2.
"""


def _default(value) -> str:
    if value == "":
        return '`""` (empty)'
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m["choices"]:
        return ", ".join(f"`{c}`" for c in m["choices"])
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    lo, hi = m["min"], m["max"]
    if lo is None and hi is None:
        return kind
    lower = None if lo is None else f"{'>' if m['min_exclusive'] else '>='} {lo:g}"
    upper = None if hi is None else f"<= {hi:g}"
    return f"{kind}, " + " and ".join(x for x in (lower, upper) if x)


def _cell(text: str) -> str:
    """Text inside a Markdown table cell (`<name>` would be read as an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def configuration_page() -> str:
    """docs/configuration.md, from the dataclasses of hpcfl.config."""
    cfg = RunConfig()
    lines = [INTRO]
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        about = SECTIONS.get(section.name, "")
        lines += [f"## `{section.name}`", ""]
        if about:
            lines += [f"{about[0].upper()}{about[1:]}.", ""]
        lines += ["| key | default | allowed | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(values):
            lines.append(f"| `{section.name}.{f.name}` | {_default(getattr(values, f.name))} | "
                         f"{_cell(_allowed(f))} | {_cell(f.metadata['help'])} |")
        lines.append("")
    lines += ["## Renamed keys", "",
              "Old names, still read from YAML files, command lines and the configs stored in",
              "results files and checkpoints of earlier versions:", "",
              "| old name | now |", "|---|---|"]
    lines += [f"| `{old}` | `{new}` |" for old, new in RENAMED.items()]
    lines += ["", OUTRO]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(f"usage: {COMMAND}\n\nPrints the configuration page, generated from "
              "hpcfl/config.py.")
        return 0
    if argv:
        print(f"hpcfl.docs: error: takes no arguments, got {' '.join(argv)!r}; usage: "
              f"{COMMAND}", file=sys.stderr)
        return 2
    sys.stdout.write(configuration_page())
    return 0


if __name__ == "__main__":
    sys.exit(main())

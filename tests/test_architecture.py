"""The architecture of docs/ARCHITECTURE.md holds in the code: each module imports only what its
room may (the table of "Rooms" is read from the page), no import cycles, no function of more
than 8 parameters, MPI and HDF5 where they belong, and the round names no defense."""
import ast
import re
from pathlib import Path

from hpcfl.privacy.defenses import DEFENSES

ROOT = Path(__file__).resolve().parent.parent
LIMITED = ("hpcfl.algorithms", "hpcfl.engine", "hpcfl.models", "hpcfl.sgd",
           "hpcfl.privacy.attacks", "hpcfl.privacy.defenses")  # no h5py there


def modules() -> dict[str, Path]:
    out = {}
    for p in [*ROOT.glob("hpcfl/**/*.py"), *ROOT.glob("analysis/**/*.py")]:
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = modules()


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports(name: str) -> list[str]:
    """Every module `name` imports, at any level (hpcfl's resolved to modules)."""
    path, out = MODULES[name], []
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append(full if full in MODULES else base)
    return out


def internal(target: str) -> str | None:
    """The hpcfl/analysis module an import names (None for third-party)."""
    while target and target not in MODULES:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target or None


def rooms() -> list[tuple[list[str], list[str] | None]]:
    """(modules, may import; None: anything) from the table of docs/ARCHITECTURE.md."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text[text.index("## Rooms"):text.index("## Plugging in")]
    out = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([\w.]+)`", cells[0])
        allowed = None if cells[2] == "anything" else re.findall(r"`([\w.]+)`", cells[2])
        out.append((names, allowed))
    return out


def room_of(name: str, table) -> tuple[str, list[str] | None] | None:
    best = None
    for names, allowed in table:
        for n in names:
            if within(name, n) and (best is None or len(n) > len(best[0])):
                best = (n, allowed)
    return best


def test_every_module_imports_only_what_its_room_may():
    table = rooms()
    assert len(table) >= 20
    wrong = []
    for name in MODULES:
        targets = {t for t in map(internal, imports(name)) if t and t != name}
        room = room_of(name, table)
        if room is None:
            assert not targets, f"{name} has no room in docs/ARCHITECTURE.md"
            continue
        own, allowed = room
        if allowed is None:
            continue
        for t in targets:
            ok = within(t, own) or any(t == a if a == "hpcfl" else within(t, a)
                                       for a in allowed)
            if not ok:
                wrong.append(f"{name} imports {t}")
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {m: {t for t in map(internal, imports(m)) if t and t != m} for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_function_takes_more_than_8_parameters():
    wide = []
    for name, path in MODULES.items():
        if not name.startswith("hpcfl"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs
                          if x.arg not in ("self", "cls")]
                params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                if len(params) > 8:
                    wide.append(f"{name}.{node.name}: {len(params)}")
    assert not wide, wide


def test_mpi_and_hdf5_stay_in_their_rooms():
    for name in MODULES:
        third = set(imports(name))
        if any(within(t, "mpi4py") for t in third):
            assert name == "hpcfl.world", name
        if any(within(t, "h5py") for t in third):
            assert not any(within(name, r) for r in LIMITED), name


def test_the_round_names_no_defense():
    """The loop and the engine call the defense interface; adding one touches neither."""
    assert len(DEFENSES) >= 6
    for path in [ROOT / "hpcfl" / "loop.py", *(ROOT / "hpcfl" / "engine").glob("*.py")]:
        text = path.read_text()
        for name in DEFENSES:
            assert name not in text, (path.name, name)


def test_code_cites_the_architecture_in_the_repository():
    """Comments point at docs/ARCHITECTURE.md, not at a design document outside it."""
    for name, path in MODULES.items():
        assert "DESIGN" not in path.read_text(), name

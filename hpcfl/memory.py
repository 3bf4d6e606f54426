"""How much host memory this process can still take, and the refusal of a run that would not fit
(one line, before anything is allocated)."""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError


def available_memory() -> int | None:
    """Bytes of host memory this process can still take: /proc/meminfo's MemAvailable, or less
    where its memory cgroup (a Slurm job's --mem) is limited; None where neither is readable."""
    have = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    room = _cgroup_room()
    return room if have is None else have if room is None else min(have, room)


def _cgroup_room(root: Path = Path("/")) -> int | None:
    """The least limit minus usage of this process's memory cgroup and its ancestors (v2, or
    v1), where the limit is set (Slurm sets it on the job, above the task's cgroup); None:
    no limit, or none readable. `root`: where /proc and /sys are (a test's folder)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "":
            base, files = root / "sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = (root / "sys/fs/cgroup/memory",
                           ("memory.limit_in_bytes", "memory.usage_in_bytes"))
        else:
            continue
        leaf, rooms = base / where.lstrip("/"), []
        # up to the mount's root, which in a container is the container's own cgroup
        for folder in [leaf, *(q for q in leaf.parents if q.is_relative_to(base))]:
            try:
                limit, used = ((folder / f).read_text().strip() for f in files)
            except OSError:
                continue
            if limit.isdigit() and used.isdigit() and int(limit) < 2 ** 60:  # v1's "no limit"
                rooms.append(int(limit) - int(used))
        if rooms:
            return min(rooms)
    return None


def refuse_unless_fits(need: float, have: float | None, what: str, hint: str) -> None:
    """One line (ConfigError) when `need` bytes, estimated before anything is allocated, are
    more than `have` bytes available (None: unknown, nothing refused): better than the crash or
    the swapping that would follow. `what` says what needs it, `hint` what to do."""
    if have is not None and need > have:
        raise ConfigError(f"{what} need about {need / 1e9:,.1f} GB of memory, and "
                          f"{max(have, 0) / 1e9:,.1f} GB is available; {hint}")

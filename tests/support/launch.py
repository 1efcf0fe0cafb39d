"""Many `qtune` commands in one process start: the distributed tests' driver.

A launch pays for its interpreters and imports once (a torchrun launch: the launcher and one
process per rank), so the tests run every command they compare through ONE launch of a small
driver that calls `qtune.cli.main(argv)` for each command in turn and stops at the first that
fails. Under torchrun the ranks keep one process group for all the commands, as a user's own
script calling qtune several times would.

Every process records the files it opens for writing (and renames, creates or removes) below
ROOT with an audit hook and leaves them in `writes-RANK.json` beside the driver, so a test can
say which rank wrote what.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from support.serving import free_port

DRIVER = textwrap.dedent("""
    import json, os, sys

    root = os.path.abspath(sys.argv[1])
    commands = json.loads(open(sys.argv[2], encoding="utf-8").read())
    rank = int(os.environ.get("RANK", "0"))
    writes = []
    WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under_root(path):
        if isinstance(path, int):
            return None
        path = os.path.abspath(os.fsdecode(path))
        return path if path == root or path.startswith(root + os.sep) else None

    def hook(event, args):
        if event == "open" and args[2] is not None and args[2] & WRITING:
            paths = [args[0]]
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            inside = under_root(path)
            if inside is not None:
                writes.append([event, os.path.relpath(inside, root)])

    sys.addaudithook(hook)
    from qtune.cli import main
    from qtune.distributed import exit_process

    for argv in commands:
        code = main(argv)
        if code:
            exit_process(code)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"writes-{rank}.json"), "w") as f:
        json.dump(writes, f)
    exit_process(0)
""")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")


@dataclass
class Launched:
    stdout: str
    stderr: str
    writes: dict[int, list] = field(default_factory=dict)  # rank -> [[event, path below root], ...]


def launcher(nproc: int) -> list[str]:
    """`torchrun --nproc_per_node nproc` on CPUs (a free rendezvous port); nproc 0: plain `python`."""
    if not nproc:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())]


def launch_env() -> dict[str, str]:
    """This environment less any launcher's variables, on CPUs, one OpenMP thread per process (so
    numbers that tests compare exactly do not depend on how the shared CPU splits the work)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def run_commands(commands: list[list], root: Path, work: Path, nproc: int = 2, timeout: float = 600) -> Launched:
    """Run every command (argv lists for `qtune.cli.main`) in one launch of `nproc` ranks (0: one
    plain process), in order; fails the test with the output's tail when one fails. Writes below
    `root` are recorded per rank; `work` (outside `root`) holds the driver, the command list and the
records."""
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("writes-*.json"):
        old.unlink()
    driver, listed = work / "driver.py", work / f"commands-{nproc}.json"
    driver.write_text(DRIVER, encoding="utf-8")
    listed.write_text(json.dumps([[str(a) for a in argv] for argv in commands]), encoding="utf-8")
    cmd = [*launcher(nproc), str(driver), str(root), str(listed)]
    done = subprocess.run(cmd, cwd=work, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"{' '.join(cmd)}\nexit {done.returncode}\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-6000:]}")
    writes = {int(f.stem.split("-")[1]): json.loads(f.read_text(encoding="utf-8")) for f in work.glob("writes-*.json")}
    return Launched(done.stdout, done.stderr, writes)

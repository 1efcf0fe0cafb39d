"""The names models are served under: what clients send as `model` and what `/v1/models` lists.

Each model flag of `qtune serve` takes `DIR` or `NAME=DIR` (vLLM's `--served-model-name` in one
flag). Without NAME a local folder is served as its folder name, and a folder that a training run
names generically (`best`, `last`, `checkpoint-N`) as `PARENT-best`, so `runs/fin-emb/best` is
`fin-emb-best`; a hub id is served as the id (`BAAI/bge-small-en-v1.5`). The server's own paths
never reach a client. When default names clash (one folder in two roles, or two runs' `best`
folders in two roles) each clashing default gets its role as a suffix (`fin-emb-best-embedding`,
`fin-emb-best-reranker`); names that still clash, and NAMEs given twice, are refused at start.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qtune.errors import QtuneError

# Folder names a training run gives its checkpoints: they say which checkpoint, not which model.
GENERIC_FOLDER = re.compile(r"(best|last|final|checkpoint[-_]?\d*|step[-_]?\d+|epoch[-_]?\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class ServedSource:
    """One model to serve: its public `name`, its `role` (the flag: embedding, classifier, ...) and
    where it loads from (`source`: a folder or hub id)."""

    name: str
    role: str
    source: str
    named: bool  # NAME was given (never renamed)


def split_flag(value: str) -> tuple[str | None, str]:
    """(NAME or None, DIR) of one flag value. A value that is an existing path is a path even if
    it holds '=' (a folder may be called `lr=1e-4`)."""
    if Path(value).exists() or "=" not in value:
        return None, value
    name, _, source = value.partition("=")
    if not source:
        raise QtuneError(f"{value!r}: nothing after '='; give NAME=DIR")
    check_name(name, value)
    return name, source


def check_name(name: str, flag: str) -> None:
    """Names go into JSON answers, metrics labels and log lines: printable text without spaces,
    not starting with '/' (that reads as a path)."""
    if not name:
        raise QtuneError(f"{flag!r}: the name before '=' is empty; give NAME=DIR")
    if any(c.isspace() or not c.isprintable() for c in name) or name.startswith("/"):
        raise QtuneError(f"{flag!r}: a served model name is printable text without spaces and does not start "
                         f"with '/', got {name!r}")


def default_name(source: str) -> str:
    """The folder's name (`PARENT-NAME` for a generic checkpoint folder), or the hub id as given."""
    path = Path(source)
    if not path.exists():
        return source  # a hub id: the name clients of other servers know it by
    path = path.resolve()
    if GENERIC_FOLDER.fullmatch(path.name) and path.parent.name:
        return f"{path.parent.name}-{path.name}"
    return path.name or source


def served_sources(roles: dict[str, list[str]]) -> list[ServedSource]:
    """Every flag value of every role (role -> its values, in flag order) with its served name; a
    QtuneError, before anything loads, for names given twice or defaults that cannot be told apart."""
    flags = []
    for role, values in roles.items():
        for value in values:
            name, source = split_flag(value)
            flags.append((role, source, name))
    twice = [(role, source) for (role, source), n in Counter((r, _same_folder(s)) for r, s, _ in flags).items()
             if n > 1]
    if twice:
        role, source = twice[0]
        raise QtuneError(f"{source} is given more than once as --{role}; serve one folder once per role")
    given = Counter(name for _, _, name in flags if name is not None)
    repeated = sorted(name for name, n in given.items() if n > 1)
    if repeated:
        raise QtuneError(f"served model name {repeated[0]!r} is given to more than one model; each served model "
                         "needs its own name (NAME=DIR)")
    defaults = {(role, source): default_name(source) for role, source, name in flags if name is None}
    clashing = Counter(defaults.values())
    served = []
    for role, source, name in flags:
        if name is not None:
            served.append(ServedSource(name, role, source, named=True))
            continue
        name = defaults[(role, source)]
        if clashing[name] > 1 or name in given:
            name = f"{name}-{role}"
        served.append(ServedSource(name, role, source, named=False))
    _refuse_clashes(served)
    return served


def _same_folder(source: str) -> str:
    return str(Path(source).resolve()) if Path(source).exists() else source


def _refuse_clashes(served: list[ServedSource]) -> None:
    seen: dict[str, ServedSource] = {}
    for entry in served:
        other = seen.setdefault(entry.name, entry)
        if other is not entry:
            raise QtuneError(f"two models would be served as {entry.name!r} (--{other.role} {other.source} and "
                             f"--{entry.role} {entry.source}); name them: --{entry.role} NAME={entry.source}")

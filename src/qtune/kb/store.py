"""A persistent vector store of FAQ entries on Milvus: an embedded Milvus Lite file (`kb.db`) or a
Milvus server (`http://host:19530`, `token=`), through the same `MilvusClient` code.

Two collections: `qtune_faq` holds the entries (id, vector, question, answer) and `qtune_faq_meta`
one row naming the embedding model that built them (its path or hub id, the fingerprint of its
weights, see `qtune.kb.faq.embedder_fingerprint`) and their dimension, so a server URI carries its
own metadata exactly as a file does. Vectors are L2-normalised; the COSINE metric makes scores cosines.

Durability: Milvus Lite appends every write to its write-ahead log and flushes it to the OS before
the call returns, so an acknowledged write survives the process being killed (tests/test_kb.py
proves it with SIGKILL). After each write on a local file we also `flush()`, which moves the data
into segment files behind an fsync'ed manifest: less left to WAL replay after a machine crash.
A Milvus server persists acknowledged writes in its own log; flushing there is rate-limited and
unnecessary, so it is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtune.errors import QtuneError, held_logs
from qtune.records import FaqEntry

ENTRIES = "qtune_faq"
META = "qtune_faq_meta"
META_ID = "kb"
FORMAT_VERSION = 1
# Milvus VARCHAR limits count UTF-8 bytes.
MAX_ID_BYTES = 512
MAX_TEXT_BYTES = 65535
_REMOTE_PREFIXES = ("http://", "https://", "tcp://", "grpc://", "unix:")


@dataclass(frozen=True)
class Hit:
    id: str
    question: str
    answer: str
    score: float  # cosine similarity of the query vector and the entry's vector


def is_local(uri: str) -> bool:
    return not str(uri).startswith(_REMOTE_PREFIXES)


# The loggers Milvus Lite and pymilvus log a failed open or write on, each with a traceback, before
# the caller gets an exception that says less ("Open local milvus failed"); qtune holds them back
# while it turns the failure into one line (`qtune.errors.held_logs`).
MILVUS_LOGGERS = ("milvus_lite.server_manager", "milvus_lite.adapter.grpc.server", "milvus_lite.adapter.grpc.servicer",
                  "pymilvus.decorators")
LOCK_FILE = "LOCK"  # what Milvus Lite flocks inside a .db folder while a process has it open


def _connect(uri: str, token: str | None):
    try:
        from pymilvus import MilvusClient
    except ImportError:  # pragma: no cover - both are dependencies of qtune
        raise QtuneError("the knowledge base needs pymilvus and milvus-lite: pip install pymilvus milvus-lite") from None
    uri = str(uri)
    if is_local(uri):
        _check_local_path(uri)
        uri = str(Path(uri).resolve())
    with held_logs(*MILVUS_LOGGERS) as held:
        try:
            return MilvusClient(uri, token=token or "")
        except Exception as e:  # noqa: BLE001 - connection refused, bad token, unreadable file: say which KB
            cause = _logged_error(held)
            held.clear()
            if is_local(uri) and _is_locked(cause):
                raise QtuneError(_held_by_another(uri)) from None
            raise QtuneError(f"cannot open the knowledge base at {uri}: {cause or e}") from None


def _logged_error(records) -> BaseException | None:
    """The exception behind a failure that Milvus Lite logged instead of raising."""
    for record in records:
        if record.exc_info and record.exc_info[1] is not None:
            return record.exc_info[1]
    return None


def _is_locked(error: BaseException | None) -> bool:
    """Whether Milvus Lite failed on its LOCK (its DataDirLockedError, or the flock it raises from)."""
    while error is not None:
        if type(error).__name__ == "DataDirLockedError" or isinstance(error, BlockingIOError):
            return True
        error = error.__cause__
    return False


def _held_by_another(uri: str) -> str:
    """Milvus Lite lets one process at a time open a .db: who has it, and what to do meanwhile."""
    holder = _lock_holder(Path(uri, LOCK_FILE))
    who = f"process {holder[0]} ({holder[1]})" if holder else "another process"
    served = holder is not None and "serve" in holder[1].split()
    advice = ("query that server's /v1/match endpoint instead, or stop it first" if served else
              "wait for it to finish or stop it; while `qtune serve --kb` holds a knowledge base, query its "
              "/v1/match endpoint instead of `qtune kb search`")
    return f"the knowledge base {uri} is open in {who}, and Milvus Lite lets one process at a time use it: {advice}"


def _lock_holder(lock: Path) -> tuple[int, str] | None:
    """(pid, command line) of the process holding a flock on `lock`, from Linux's /proc/locks; None
    where that cannot be told (another OS, another PID namespace, a lock already released)."""
    try:
        stat = lock.stat()
        # /proc/locks: "1: FLOCK  ADVISORY  WRITE 4711 08:02:1234567 0 EOF" (major:minor:inode in hex:hex:dec)
        device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device and fields[4].isdigit():
                pid = int(fields[4])
                words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
                return pid, _command_line(words)
    except (OSError, ValueError):
        return None
    return None


def _command_line(words: list[str]) -> str:
    """A process's command line as people say it: `python qtune serve --kb faq.db`, not the full
    paths of the interpreter and its script."""
    words = list(words) or ["?"]
    words[0] = Path(words[0]).name
    if words[0].startswith("python") and len(words) > 1 and not words[1].startswith("-"):
        words[1] = Path(words[1]).name
    command = " ".join(words)
    return command if len(command) <= 200 else command[:197] + "..."


@contextlib.contextmanager
def _writing(uri: str, *, creating: bool = False):
    """A failed Milvus write as one QtuneError: what failed, whether anything was lost, what to do."""
    from pymilvus.exceptions import MilvusException

    with held_logs(*MILVUS_LOGGERS) as held:
        try:
            yield
        except MilvusException as e:
            held.clear()
            raise QtuneError(_write_failure(uri, getattr(e, "message", None) or str(e), creating)) from None


DISK_FULL = ("No space left", "Errno 28", "ENOSPC", "Disk quota exceeded", "Errno 122")


def _write_failure(uri: str, reason: str, creating: bool) -> str:
    if any(sign in reason for sign in DISK_FULL):
        what = (f"the disk holding {uri} is full" if is_local(uri) else
                f"the Milvus server at {uri} reports a full disk") + f" ({reason})"
        fix = "free disk space"
    else:
        what = f"writing to the knowledge base {uri} failed ({reason})"
        fix = "remove the cause"
    if creating:
        return (f"{what}, while the knowledge base was being created: it holds no entries yet. {fix.capitalize()}, "
                f"delete {uri} and run `qtune kb build` again")
    # Milvus Lite acknowledges a write once its write-ahead log has it (see the module docstring): a
    # write that failed at the flush after it was acknowledged comes back when the KB is next opened.
    return (f"{what}. Nothing acknowledged was lost: the entries written before are kept; this write's entries "
            f"may or may not be there. {fix.capitalize()}, then write the same entries again: "
            f"`qtune kb add` replaces entries by id, so repeating it duplicates nothing")


def _check_local_path(uri: str) -> None:
    # pymilvus treats only a path ending in .db as a Milvus Lite file.
    if Path(uri).suffix != ".db":
        raise QtuneError(f"{uri}: a local knowledge base path must end in .db (or pass a Milvus server URI)")


class KnowledgeBase:
    """Entries and their vectors in Milvus. Use `create` or `open`, then `close` (or `with`)."""

    def __init__(self, client, uri: str, model: str, dimension: int, fingerprint: str | None = None):
        self._client, self.uri, self.model, self.dimension = client, str(uri), model, dimension
        # None: built by a qtune that recorded only the model's path or hub id
        self.fingerprint = fingerprint

    # ── lifecycle ───────────────────────────────────────────────

    @classmethod
    def create(cls, uri: str, *, model: str, dimension: int, token: str | None = None,
               fingerprint: str | None = None) -> KnowledgeBase:
        """A new, empty knowledge base for vectors of `model` with `dimension` values; `fingerprint`
        identifies the model's weights wherever they are later found."""
        from pymilvus import DataType, MilvusClient

        if not model:
            raise QtuneError("a knowledge base needs the name of the embedding model that builds it")
        if not isinstance(dimension, (int, np.integer)) or dimension < 1:
            raise QtuneError(f"dimension must be a positive integer, got {dimension!r}")
        client = _connect(uri, token)
        try:
            with _writing(uri, creating=True):
                existing = set(client.list_collections())
                if ENTRIES in existing or META in existing:
                    raise QtuneError(f"{uri} already holds a knowledge base; open it, or choose another path")
                # Milvus needs a vector field in every collection: the metadata row carries a dummy one.
                meta = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                meta.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
                meta.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
                meta.add_field("value", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
                meta_index = client.prepare_index_params()
                meta_index.add_index("vector", index_type="FLAT", metric_type="L2")
                client.create_collection(META, schema=meta, index_params=meta_index, consistency_level="Strong")

                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
                schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dimension))
                schema.add_field("question", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
                schema.add_field("answer", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
                index = client.prepare_index_params()
                # FLAT: exact search; FAQ collections are small and a near-duplicate must not be missed.
                index.add_index("vector", index_type="FLAT", metric_type="COSINE")
                client.create_collection(ENTRIES, schema=schema, index_params=index, consistency_level="Strong")

                # Still format 1: a qtune that does not know the fingerprint reads "model" as before.
                record = {"model": model, "dimension": int(dimension), "format": FORMAT_VERSION}
                if fingerprint is not None:
                    record["fingerprint"] = fingerprint
                client.upsert(META, [{"id": META_ID, "vector": [0.0, 0.0], "value": json.dumps(record)}])
                kb = cls(client, uri, model, int(dimension), fingerprint)
                kb._persist(META)
                return kb
        except BaseException:
            _close_client(client, uri)
            raise

    @classmethod
    def open(cls, uri: str, token: str | None = None, *, model: str | None = None,
             dimension: int | None = None) -> KnowledgeBase:
        """An existing knowledge base; with `model`/`dimension`, refuses one built differently."""
        if is_local(str(uri)):
            _check_local_path(str(uri))
        if is_local(str(uri)) and not Path(uri).exists():
            raise QtuneError(f"{uri}: no knowledge base there (build one with `qtune kb build`)")
        client = _connect(uri, token)
        try:
            collections = set(client.list_collections())
            if META not in collections or ENTRIES not in collections:
                raise QtuneError(f"{uri} is not a qtune knowledge base (no {META!r}/{ENTRIES!r} collections)")
            _load_collection(client, str(uri), META)
            _load_collection(client, str(uri), ENTRIES)
            rows = client.get(META, ids=[META_ID], output_fields=["value"])
            if not rows:
                raise QtuneError(f"{uri}: the knowledge base has lost its metadata row")
            meta = json.loads(rows[0]["value"])
            if meta.get("format") != FORMAT_VERSION:
                raise QtuneError(f"{uri}: knowledge base format {meta.get('format')!r} is not supported "
                                 f"(this qtune reads {FORMAT_VERSION})")
            kb = cls(client, uri, meta["model"], int(meta["dimension"]), meta.get("fingerprint"))
            if model is not None or dimension is not None:
                kb.check_model(model, dimension)
            return kb
        except BaseException:
            _close_client(client, uri)
            raise

    def check_model(self, model: str | None = None, dimension: int | None = None) -> None:
        """Raise unless the KB was built by `model` with `dimension` values (None: not checked)."""
        if model is not None and model != self.model:
            raise QtuneError(f"{self.uri} was built with the embedding model {self.model!r}, not {model!r}; "
                             f"rebuild it with `qtune kb build` or use {self.model!r}")
        if dimension is not None and int(dimension) != self.dimension:
            raise QtuneError(f"{self.uri} holds {self.dimension}-dimensional vectors; "
                             f"the embedding model gives {dimension}")

    def close(self) -> None:
        if self._client is not None:
            _close_client(self._client, self.uri)
            self._client = None

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def client(self):
        if self._client is None:
            raise QtuneError(f"the knowledge base {self.uri} is closed")
        return self._client

    # ── writes ──────────────────────────────────────────────────

    def upsert(self, entries: Sequence[FaqEntry], vectors) -> int:
        """Insert or replace entries by id; `vectors` is (len(entries), dimension). Returns the count."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(entries), self.dimension):
            raise QtuneError(f"expected vectors of shape ({len(entries)}, {self.dimension}), got {vectors.shape}")
        ids = [e.id for e in entries]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise QtuneError(f"duplicate ids in one upsert: {dupes[:5]}")
        for e in entries:
            problem = id_problem(e.id)
            if problem:
                raise QtuneError(f"id {e.id[:80]!r} {problem}")
            _check_bytes(e.id, MAX_ID_BYTES, "id", e.id)
            _check_bytes(e.question, MAX_TEXT_BYTES, "question", e.id)
            _check_bytes(e.answer, MAX_TEXT_BYTES, "answer", e.id)
        if not entries:
            return 0
        rows = [{"id": e.id, "vector": v.tolist(), "question": e.question, "answer": e.answer}
                for e, v in zip(entries, vectors)]
        with _writing(self.uri):
            self.client.upsert(ENTRIES, rows)
            self._persist(ENTRIES)
        return len(rows)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete entries by id; returns how many of them existed."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return 0
        present = [row["id"] for row in self._rows(ids, ["id"])]
        if present:
            with _writing(self.uri):
                self.client.delete(ENTRIES, filter=_id_filter(present))
                self._persist(ENTRIES)
        return len(present)

    def _persist(self, collection: str) -> None:
        if is_local(self.uri):
            self.client.flush(collection)

    # ── reads ───────────────────────────────────────────────────

    def search(self, vector, top_k: int = 5) -> list[Hit]:
        """The `top_k` entries nearest to `vector` (dimension,), best first."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.dimension,):
            raise QtuneError(f"expected a query vector of shape ({self.dimension},), got {vector.shape}")
        if top_k < 1:
            raise QtuneError(f"top_k must be at least 1, got {top_k}")
        result = self.client.search(ENTRIES, data=[vector.tolist()], limit=int(top_k), anns_field="vector",
                                    output_fields=["question", "answer"], search_params={"metric_type": "COSINE"})
        return [Hit(str(h["id"]), h["entity"]["question"], h["entity"]["answer"], float(h["distance"]))
                for h in result[0]]

    def get(self, ids: Sequence[str]) -> list[FaqEntry]:
        """The entries with these ids, in the order asked; unknown ids are left out."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return []
        rows = {row["id"]: row for row in self._rows(ids, ["question", "answer"])}
        return [FaqEntry(i, rows[i]["question"], rows[i]["answer"]) for i in ids if i in rows]

    def _rows(self, ids: list[str], fields: list[str]) -> list[dict]:
        # An id no filter can spell cannot be stored either (`id_problem`): it is simply absent.
        ids = [i for i in ids if _spellable(i)]
        if not ids:
            return []
        return self.client.query(ENTRIES, filter=_id_filter(ids), output_fields=fields)

    def count(self) -> int:
        result = self.client.query(ENTRIES, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])


def id_problem(entry_id: str) -> str | None:
    """Why `entry_id` cannot be an id (None: it can). Control characters are refused: they are
    never meant as part of a name, and Milvus' filter language cannot spell most of them, so an
    entry holding one could be written but never read or deleted by id."""
    bad = next((c for c in entry_id if _is_control(c)), None)
    if bad is not None:
        return f"contains the control character U+{ord(bad):04X}; ids must be plain text"
    return None


def _is_control(char: str) -> bool:
    return ord(char) < 0x20 or ord(char) == 0x7F


# The escapes Milvus' filter language knows; any other control character cannot be spelled in it.
_FILTER_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _spellable(entry_id: str) -> bool:
    return not any(_is_control(c) and c not in _FILTER_ESCAPES for c in entry_id)


def _id_filter(ids: Sequence[str]) -> str:
    """`id in [...]` with every id a string literal Milvus reads back exactly (pymilvus' own `ids=`
    quoting does not escape ' and \\, and Milvus Lite has no filter templates). JSON escaping is
    not it: Milvus rejects \\u0001 and \\b."""
    return "id in [" + ", ".join('"' + "".join(_FILTER_ESCAPES.get(c, c) for c in i) + '"' for i in ids) + "]"


def _check_bytes(text: str, limit: int, field: str, entry_id: str) -> None:
    if len(text.encode("utf-8")) > limit:
        raise QtuneError(f"entry {entry_id[:80]!r}: {field} is longer than Milvus allows ({limit} UTF-8 bytes)")


def _load_collection(client, uri: str, name: str) -> None:
    """Load collection `name`. Milvus Lite keeps a per-segment index file beside the stored vectors,
    a cache it rebuilds from them when the file is missing, and writes it in place: a writer killed
    at that moment leaves it empty, and loading then fails ("No data left in file"). For a local
    knowledge base those empty cache files are removed and the load is tried once more; the rows
    themselves are in the data files, so nothing acknowledged is lost."""
    from pymilvus.exceptions import MilvusException

    try:
        client.load_collection(name)
    except MilvusException:
        if not is_local(uri) or not _drop_empty_index_files(Path(uri) / "collections" / name):
            raise
        client.load_collection(name)


def _drop_empty_index_files(folder: Path) -> int:
    """Remove the empty `*.idx` files under `folder`'s `indexes` folders; how many. Nothing is
    removed through a link: a linked folder on the way is left alone, links are never followed."""
    if any(p.is_symlink() for p in (folder.parent.parent, folder.parent, folder)) or not folder.is_dir():
        return 0
    removed = 0
    for root, _dirs, files in os.walk(folder):  # does not descend into linked folders
        if Path(root).name != "indexes":
            continue
        for name in files:
            path = Path(root, name)
            if name.endswith(".idx") and not path.is_symlink() and path.stat().st_size == 0:
                path.unlink()
                removed += 1
    return removed


def _close_client(client, uri: str) -> None:
    """Close the client and, for a local file, stop Milvus Lite's in-process server for it.

    pymilvus keeps one server per .db path alive until the interpreter exits, holding the file's
    LOCK; stopping it releases the file for another process and makes a reopen read from disk.
    """
    try:
        client.close()
    finally:
        if is_local(uri):
            try:
                from milvus_lite.server_manager import server_manager_instance
            except ImportError:  # pragma: no cover - older milvus-lite runs a subprocess instead
                return
            server_manager_instance.release_server(str(Path(uri).resolve()))

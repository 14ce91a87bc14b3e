"""A small SlimPajama-layout corpus built offline from the Python standard library (`rwkv5 data sample`).

It is the embedded default source of `pretrain/tiny`: any machine with Python can build it, so the demo needs
no download. The layout and line format are SlimPajama's::

    train/chunk{1..k}/example_train_{i}.jsonl.zst
    validation/chunk{1..k}/example_holdout_{i}.jsonl.zst
    {"text": "...", "meta": {"redpajama_set_name": "RedPajamaGithub"}}

Text comes from the standard library's sources (read as files, never imported) and from `pydoc_data.topics`
(the language reference as plain text). Each kind of text stands in for the set it most resembles:

| set | documents |
|---|---|
| RedPajamaGithub | source files |
| RedPajamaBook | long language-reference topics (a chapter each) |
| RedPajamaWikipedia | short reference topics and module docstrings, as articles titled by their subject |
| RedPajamaArXiv | a class's documentation as a LaTeX paper (abstract, sections per method) |
| RedPajamaStackExchange | a question about a function and its docstring as the answer |
| RedPajamaC4 | the first paragraphs of a module's docstrings, as a clean web page |
| RedPajamaCommonCrawl | a module's comments, as a web page with navigation and footer boilerplate |

Files are read in an order fixed by a hash of their relative path (a mix of packages, same on every run), until
each set has its share of the requested size. Documents are shuffled with a seeded `random.Random`, dealt to
files round robin and compressed at a fixed zstd level; every other file is written as several zstd frames,
as some real SlimPajama files are. The result is byte-identical across builds with the same Python (the same
standard library files), with no timestamps anywhere.

Each file is written atomically. `manifest.json` (the download manifest format of `data_prep.download`, so a
`LocalSource` over this folder verifies sha256s) is written last and marks the build complete: a second build
with the same spec leaves everything alone.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import random
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.atomic import atomic_write_bytes
from data_prep.errors import SampleError
from data_prep.source import MANIFEST_FORMAT, MANIFEST_NAME

__all__ = ["SET_NAMES", "SampleSpec", "SampleResult", "build_sample"]

SET_NAMES = (
    "RedPajamaCommonCrawl",
    "RedPajamaC4",
    "RedPajamaGithub",
    "RedPajamaBook",
    "RedPajamaArXiv",
    "RedPajamaWikipedia",
    "RedPajamaStackExchange",
)
# Share of the requested text per set. The caps add up to more than 1 so that sets with plenty of text (code)
# make up for scarce ones (module docstrings) instead of the build reading the whole standard library.
_SHARES = {
    "RedPajamaCommonCrawl": 0.20,
    "RedPajamaC4": 0.12,
    "RedPajamaGithub": 0.45,
    "RedPajamaBook": 0.12,
    "RedPajamaArXiv": 0.12,
    "RedPajamaWikipedia": 0.10,
    "RedPajamaStackExchange": 0.12,
}
_BOOK_MIN_CHARS = 6000
_GITHUB_MAX_CHARS = 32_000
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}
_MAX_SOURCE_BYTES = 200_000
_BUILDING_MARKER = ".sample-building"
_FILE_RE = re.compile(r"example_(train|holdout)_\d+\.jsonl\.zst(\..*\.tmp|\.tmp-.*)?$")


@dataclass(frozen=True)
class SampleSpec:
    """What to build. Every field is recorded in the manifest; a folder built with another spec is refused.

    Args:
        megabytes: approximate uncompressed text, train and validation together, in MB (10^6 bytes). The
            standard library holds roughly 15 MB that fits the sets' shapes; a larger request gets what there
            is. Default: 3.0 (about 0.8M tokens; builds in seconds).
        train_chunks: number of `train/chunk{n}` folders. Default: 2.
        train_files_per_chunk: files per train chunk. Default: 4.
        validation_chunks: number of `validation/chunk{n}` folders. Default: 2.
        validation_files_per_chunk: files per validation chunk. Default: 2.
        validation_every: one document in this many of each set goes to validation (the first one always does,
            so every set appears in both splits). Default: 20.
        seed: seed of the document shuffle. Default: 0.
        zstd_level: compression level (fixed, so bytes are reproducible). Default: 3.
    """

    megabytes: float = 3.0
    train_chunks: int = 2
    train_files_per_chunk: int = 4
    validation_chunks: int = 2
    validation_files_per_chunk: int = 2
    validation_every: int = 20
    seed: int = 0
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if not (isinstance(self.megabytes, (int, float)) and 0 < self.megabytes <= 1000):
            raise SampleError(f"sample.megabytes must be in (0, 1000], got {self.megabytes!r}")
        for name in ("train_chunks", "train_files_per_chunk", "validation_chunks", "validation_files_per_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise SampleError(f"sample.{name} must be an integer in 1..1000, got {value!r}")
        if isinstance(self.validation_every, bool) or not isinstance(self.validation_every, int) \
                or self.validation_every < 2:
            raise SampleError(f"sample.validation_every must be an integer >= 2, got {self.validation_every!r}")
        if not isinstance(self.zstd_level, int) or not 1 <= self.zstd_level <= 19:
            raise SampleError(f"sample.zstd_level must be in 1..19, got {self.zstd_level!r}")


@dataclass
class SampleResult:
    """What `build_sample` found or did.

    Args:
        out: the output folder.
        manifest: the manifest's content (also in `out/manifest.json`).
        skipped: True when a complete build with the same spec was already there.
    """

    out: Path
    manifest: dict
    skipped: bool = False
    totals: dict = field(init=False)

    def __post_init__(self) -> None:
        self.totals = self.manifest["totals"]


def build_sample(out: str | Path, spec: SampleSpec | None = None) -> SampleResult:
    """Build the sample corpus in `out`, or leave it alone if a complete build with `spec` is there.

    Args:
        out: output folder; created if missing. It must be empty or hold an earlier (possibly interrupted)
            sample build: the builder never overwrites files it did not write.
        spec: what to build. Default: `SampleSpec()`.

    Returns:
        A `SampleResult` with the manifest (per file: size, sha256, documents, text bytes, frames, sets).

    Raises:
        SampleError: invalid spec, `out` holds something else or a sample of another spec, or the standard
            library has too little text for the requested layout.
    """
    spec = spec or SampleSpec()
    out = Path(out)
    source = _source_description(spec)
    existing = _complete_build(out, source)
    if existing is not None:
        return SampleResult(out=out, manifest=existing, skipped=True)
    _claim(out)
    # From here until the new manifest lands, the folder is an unfinished build (the claim marker says so).
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    splits = _split_documents(_collect_documents(spec), spec)
    files: dict[str, dict] = {}
    for split, stem, chunks, per_chunk in (
        ("train", "example_train", spec.train_chunks, spec.train_files_per_chunk),
        ("validation", "example_holdout", spec.validation_chunks, spec.validation_files_per_chunk),
    ):
        docs = splits[split]
        paths = [f"{split}/chunk{c}/{stem}_{i}.jsonl.zst" for c in range(1, chunks + 1) for i in range(per_chunk)]
        if len(docs) < len(paths):
            raise SampleError(
                f"sample: only {len(docs)} {split} documents for {len(paths)} files; raise --megabytes or lower "
                f"the number of {split} chunks/files"
            )
        for number, path in enumerate(paths):
            files[path] = _write_file(out, path, docs[number :: len(paths)], spec, frames=1 + 2 * (number % 2))

    _remove_stale(out, set(files))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "source": source,
        "totals": _totals(files),
        "files": dict(sorted(files.items())),
    }
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    (out / _BUILDING_MARKER).unlink(missing_ok=True)
    return SampleResult(out=out, manifest=manifest)


def _source_description(spec: SampleSpec) -> dict:
    return {
        "kind": "sample",
        "builder": "data_prep.sample",
        "python": platform.python_version(),
        "spec": asdict(spec),
    }


def _complete_build(out: Path, source: dict) -> dict | None:
    """The manifest of a complete build of `source` in `out`, None if there is none (or it is damaged)."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SampleError(f"{path}: unreadable manifest ({exc}); move the folder away to rebuild") from None
    theirs = manifest.get("source", {}) if isinstance(manifest, dict) else {}
    if theirs.get("kind") != "sample":
        raise SampleError(f"{path}: {out} holds data that the sample builder did not write; choose another --out")
    if theirs != source:
        raise SampleError(
            f"{out} holds a sample built with {theirs.get('spec')} (Python {theirs.get('python')}), not "
            f"{source['spec']} (Python {source['python']}); choose another --out or delete it"
        )
    for name, entry in manifest.get("files", {}).items():
        file = out / name
        if not file.is_file() or file.stat().st_size != entry.get("size"):
            return None
    return manifest


def _claim(out: Path) -> None:
    """Mark `out` as ours before writing, refusing a non-empty folder that an earlier build did not claim."""
    if out.exists() and not out.is_dir():
        raise SampleError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / _BUILDING_MARKER).exists() \
            and not (out / MANIFEST_NAME).exists():
        raise SampleError(f"{out} is not empty and was not written by the sample builder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / _BUILDING_MARKER).touch()


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete data files of an earlier interrupted build (another spec) that this build did not write."""
    for split in ("train", "validation"):
        for path in sorted((out / split).glob("chunk*/*")):
            rel = path.relative_to(out).as_posix()
            if path.is_file() and rel not in keep and _FILE_RE.search(path.name.lstrip(".")):
                path.unlink()


def _collect_documents(spec: SampleSpec) -> dict[str, list[str]]:
    """Documents per set, read until each set has its share of `spec.megabytes` (or the sources run out)."""
    budget = spec.megabytes * 1e6
    caps = {name: share * budget for name, share in _SHARES.items()}
    docs: dict[str, list[str]] = {name: [] for name in SET_NAMES}
    sizes = dict.fromkeys(SET_NAMES, 0)

    def add(set_name: str, text: str) -> None:
        if text.strip() and sizes[set_name] < caps[set_name]:
            docs[set_name].append(text)
            sizes[set_name] += len(text.encode("utf-8"))

    for title, text in _reference_topics():
        add("RedPajamaBook" if len(text) >= _BOOK_MIN_CHARS else "RedPajamaWikipedia", f"{title}\n\n{text}")
    for module, source, tree in _stdlib_modules():
        if sum(sizes.values()) >= budget:
            break
        for set_name, text in _module_documents(module, source, tree):
            add(set_name, text)
    return docs


def _reference_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        # Some distributions leave pydoc_data out; the module docstrings still give every set some text.
        return []
    return [(_topic_title(key), text.strip()) for key, text in sorted(topics.items())]


def _topic_title(key: str) -> str:
    return key.replace("-", " ").replace("_", " ").strip().capitalize()


def _stdlib_modules() -> Iterator[tuple[str, str, ast.Module]]:
    """(dotted module name, source, syntax tree) of standard library files, in a fixed pseudo-random order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("config-", "lib-")))
        for name in names:
            if name.endswith(".py"):
                found.append((Path(folder) / name).relative_to(root).as_posix())
    for rel in sorted(found, key=lambda r: hashlib.sha256(r.encode()).hexdigest()):
        path = root / rel
        try:
            if path.stat().st_size > _MAX_SOURCE_BYTES:
                continue
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        module = rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        yield module, source, tree


def _module_documents(module: str, source: str, tree: ast.Module) -> Iterator[tuple[str, str]]:
    yield "RedPajamaGithub", _truncate_lines(source, _GITHUB_MAX_CHARS)
    module_doc = ast.get_docstring(tree) or ""
    if len(module_doc) >= 300:
        yield "RedPajamaWikipedia", f"{module}\n\n{module_doc}"

    definitions = list(_documented_definitions(tree))
    paragraphs = [_first_paragraph(doc) for _, _, doc in definitions]
    page = "\n\n".join(p for p in [_first_paragraph(module_doc), *paragraphs] if len(p) >= 40)
    if len(page) >= 300:
        yield "RedPajamaC4", f"{module} documentation\n\n{page}"

    for node, qualname, doc in definitions:
        if isinstance(node, ast.ClassDef):
            methods = [
                (child.name, ast.get_docstring(child))
                for child in node.body
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(child)
            ]
            if len(methods) >= 2:
                yield "RedPajamaArXiv", _as_paper(module, qualname, doc, methods)
        elif len(doc) >= 80:
            yield "RedPajamaStackExchange", _as_question(module, qualname, node, doc)

    comments = [line.strip().lstrip("#").strip() for line in source.splitlines() if line.strip().startswith("#")]
    comments = [c for c in comments if len(c) > 3 and not c.startswith(("!", "-*-"))]
    if sum(len(c) for c in comments) >= 300:
        yield "RedPajamaCommonCrawl", _as_web_page(module, comments)


def _documented_definitions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[ast.AST, str, str]]:
    """(node, qualified name, docstring) of documented classes and functions, in source order."""
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qualname = f"{prefix}{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield node, qualname, doc
            if isinstance(node, ast.ClassDef):
                yield from _documented_definitions(node, f"{qualname}.")


def _first_paragraph(text: str) -> str:
    return " ".join(text.strip().split("\n\n", 1)[0].split())


def _truncate_lines(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: text.rfind("\n", 0, limit) + 1]


def _as_paper(module: str, qualname: str, doc: str, methods: list[tuple[str, str]]) -> str:
    sections = "".join(f"\\subsection{{\\texttt{{{name}}}}}\n\n{text}\n\n" for name, text in methods)
    return (
        f"\\title{{The \\texttt{{{qualname}}} class of \\texttt{{{module}}}}}\n\n"
        f"\\begin{{abstract}}\n{_first_paragraph(doc)}\n\\end{{abstract}}\n\n"
        f"\\section{{Introduction}}\n\n{doc}\n\n\\section{{Methods}}\n\n{sections}"
    ).rstrip() + "\n"


def _as_question(module: str, qualname: str, node: ast.AST, doc: str) -> str:
    signature = f"{qualname}({ast.unparse(node.args)})"
    return (
        f"Q: What does {module}.{signature} do, and how do I use it?\n\n"
        f"I found `{qualname}` in the `{module}` module but the name alone does not tell me what it returns.\n\n"
        f"A: From its documentation:\n\n{doc}\n\nYou call it as `{module}.{signature}`."
    )


def _as_web_page(module: str, comments: list[str]) -> str:
    body = "\n".join(comments)
    return (
        f"Home | Docs | Blog | Contact\n{module} - developer notes\n\n{body}\n\n"
        f"Share this page: Twitter Facebook Email\n(c) All rights reserved. Privacy policy | Terms of use"
    )


def _split_documents(docs: dict[str, list[str]], spec: SampleSpec) -> dict[str, list[tuple[str, str]]]:
    """Per split, shuffled (set name, text) pairs: document k of a set goes to validation when k % every == 0."""
    missing = [name for name in SET_NAMES if len(docs[name]) < 2]
    if missing:
        raise SampleError(f"sample: the standard library gave fewer than 2 documents for {missing}")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": []}
    for name in SET_NAMES:
        for k, text in enumerate(docs[name]):
            splits["validation" if k % spec.validation_every == 0 else "train"].append((name, text))
    rng = random.Random(spec.seed)
    for pairs in splits.values():
        rng.shuffle(pairs)
    return splits


def _write_file(out: Path, rel: str, docs: list[tuple[str, str]], spec: SampleSpec, frames: int) -> dict:
    """Compress `docs` as jsonl into `frames` zstd frames, atomically; return the manifest entry."""
    import zstandard

    lines = [
        (json.dumps({"text": text, "meta": {"redpajama_set_name": name}}, ensure_ascii=False) + "\n").encode()
        for name, text in docs
    ]
    frames = min(frames, len(lines))
    compressor = zstandard.ZstdCompressor(level=spec.zstd_level, write_checksum=True, write_content_size=True)
    bounds = [len(lines) * f // frames for f in range(frames + 1)]
    data = b"".join(compressor.compress(b"".join(lines[a:b])) for a, b in zip(bounds, bounds[1:]))
    atomic_write_bytes(out / rel, data)
    by_set: dict[str, int] = {}
    for name, _ in docs:
        by_set[name] = by_set.get(name, 0) + 1
    return {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "checked": "built",
        "documents": len(docs),
        "text_bytes": sum(len(text.encode("utf-8")) for _, text in docs),
        "frames": frames,
        "by_set": dict(sorted(by_set.items())),
    }


def _totals(files: dict[str, dict]) -> dict:
    totals: dict = {"files": len(files), "documents": 0, "text_bytes": 0, "compressed_bytes": 0, "by_split": {}}
    for rel, entry in files.items():
        totals["documents"] += entry["documents"]
        totals["text_bytes"] += entry["text_bytes"]
        totals["compressed_bytes"] += entry["size"]
        split = totals["by_split"].setdefault(rel.split("/", 1)[0], {})
        for name, count in entry["by_set"].items():
            split[name] = split.get(name, 0) + count
    return totals

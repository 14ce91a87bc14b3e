"""Tokenizer throughput per core: our reference and native (C) ones, the `rwkv` package's, the two Rust packages.

    python bench/tokenizer.py [--megabytes 1.0] [--repeats 5] [--out bench/results/tokenizer.json]

The text is the offline sample corpus (`data_prep.sample`: standard-library prose and code), plus the shared
LAMBADA and chat files and a multilingual block when `../shared/data` exists. Every implementation encodes the
same documents one call per document, after a warm-up; the native tokenizer also as one `encode_flat` call per
piece (what the tokenization stage does, ids in one uint16 array);
for each of 32 pieces
of the corpus the fastest of `--repeats` runs counts. MB/s per core is text bytes over CPU seconds of this
process (the wall-clock figure is printed too). On a shared, loaded VM even CPU time varies from run to run:
compare figures taken in one run, and look at the recorded load average. Each implementation's ids
are compared with the reference's on the whole corpus.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import zstandard

from data_prep.sample import SampleSpec, build_sample
from data_prep.tokenizer import DEFAULT_VOCAB_PATH, load_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MULTILINGUAL = [
    "中文分词测试：你好，世界。今天天气很好，我们去公园散步吧。" * 20,
    "日本語のテキストです。東京は日本の首都で、人口が最も多い都市です。" * 20,
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी भाषा, ไทย, 한국어 문장입니다. 🎉👍🏽" * 20,
]


def corpus(megabytes: float) -> list[str]:
    """Documents to encode: the sample corpus, then shared files and multilingual text where present."""
    docs: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = SampleSpec(megabytes=megabytes, train_files_per_chunk=2, validation_files_per_chunk=1)
        build_sample(Path(tmp) / "sample", spec)
        for path in sorted((Path(tmp) / "sample").rglob("*.jsonl.zst")):
            reader = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
            lines = reader.decompress(path.read_bytes()).decode("utf-8").splitlines()
            docs += [json.loads(line)["text"] for line in lines]
    if SHARED_DATA.is_dir():
        for name, stride in (("lambada_test.jsonl", 5), ("rwkv-lm-demo.jsonl", 1)):
            if (SHARED_DATA / name).exists():
                lines = (SHARED_DATA / name).read_text(encoding="utf-8").splitlines()
                docs += [json.loads(line)["text"] for line in lines[::stride]]
        docs += MULTILINGUAL
    return docs


def _flat_to_lists(flats: list) -> list[list[int]]:
    out = []
    for flat in flats:
        offsets = flat.offsets.tolist()
        out += [flat.ids[a:b].tolist() for a, b in zip(offsets, offsets[1:])]
    return out


def implementations() -> dict[str, tuple]:
    """name -> (callable(list of texts) -> outputs, callable(outputs) -> list of id lists), for what is installed."""
    impls: dict[str, object] = {}
    ours_ref = load_tokenizer(impl="reference")
    ours_fast = load_tokenizer(impl="fast")
    impls["data_prep reference (pure Python)"] = lambda texts: [ours_ref.encode(t) for t in texts]
    impls["data_prep fast (wraps pyrwkv-tokenizer)"] = lambda texts: [ours_fast.encode(t) for t in texts]
    ours_native = load_tokenizer(impl="native")
    impls["data_prep native encode (C extension)"] = lambda texts: [ours_native.encode(t) for t in texts]
    # One call per piece; the ids come back as one uint16 array (converted to lists after the timing).
    impls["data_prep native encode_flat (C extension)"] = (
        lambda texts: [ours_native.encode_flat(texts, eod=False)], _flat_to_lists)
    try:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        trie = TRIE_TOKENIZER(str(DEFAULT_VOCAB_PATH))
        impls["rwkv 0.8 TRIE_TOKENIZER (pure Python)"] = lambda texts: [trie.encode(t) for t in texts]
    except ImportError:
        pass
    import pyrwkv_tokenizer

    py = pyrwkv_tokenizer.WorldTokenizer(str(DEFAULT_VOCAB_PATH))
    impls["pyrwkv-tokenizer 0.9.1 encode"] = lambda texts: [py.encode(t) for t in texts]
    try:
        import rwkv_tokenizer

        rt = rwkv_tokenizer.WorldTokenizer(str(DEFAULT_VOCAB_PATH))
        impls["rwkv-tokenizer 0.5.2 encode"] = lambda texts: [rt.encode(t) for t in texts]
    except ImportError:
        pass
    # Last: it starts the Rust thread pool (all cores; CPU time then counts every thread).
    impls["pyrwkv-tokenizer 0.9.1 encode_batch (threads)"] = lambda texts: py.encode_batch(texts)
    return {name: fn if isinstance(fn, tuple) else (fn, list) for name, fn in impls.items()}


def measure(fn, texts: list[str], repeats: int, pieces: int = 32) -> tuple[float, float, list]:
    """(CPU seconds, wall seconds, outputs): per piece of the corpus the fastest of `repeats` runs, summed.

    Taking the minimum per piece rather than per whole run filters out bursts of interference from other
    processes (on a shared VM they inflate even CPU time) at a finer grain.
    """
    bounds = [len(texts) * i // pieces for i in range(pieces + 1)]
    parts = [texts[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    fn(parts[0])
    best_cpu, best_wall, ids = [float("inf")] * len(parts), [float("inf")] * len(parts), []
    for _ in range(repeats):
        ids = []
        for k, part in enumerate(parts):
            cpu, wall = time.process_time(), time.perf_counter()
            ids += fn(part)
            best_cpu[k] = min(best_cpu[k], time.process_time() - cpu)
            best_wall[k] = min(best_wall[k], time.perf_counter() - wall)
    return sum(best_cpu), sum(best_wall), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1.0, help="Size of the sample-corpus part.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tokenizer.json"))
    args = parser.parse_args()

    texts = corpus(args.megabytes)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    load_before = os.getloadavg()
    rows, reference_ids = [], None
    for name, (fn, to_lists) in implementations().items():
        # The pure-Python ones are tens of times slower: two runs are enough for them.
        repeats = min(2, args.repeats) if "pure Python" in name else args.repeats
        cpu, wall, outputs = measure(fn, texts, repeats)
        ids = to_lists(outputs)
        if reference_ids is None:
            reference_ids = ids
        n_tokens = sum(len(i) for i in ids)
        rows.append({
            "implementation": name,
            "mb_per_s_per_core": n_bytes / cpu / 1e6,
            "mb_per_s_wall": n_bytes / wall / 1e6,
            "tokens_per_s_per_core": n_tokens / cpu,
            "tokens": n_tokens,
            "matches_reference": ids == reference_ids,
        })
    mismatched = [r["implementation"] for r in rows if not r["matches_reference"]]

    print(f"{len(texts)} documents, {n_bytes / 1e6:.2f} MB of text, {rows[0]['tokens']} tokens; "
          f"{os.cpu_count()} cores, load average {load_before[0]:.1f}")
    print(f"{'implementation':48s} {'MB/s/core':>10s} {'MB/s wall':>10s} {'Mtok/s/core':>12s} {'same ids':>9s}")
    for r in rows:
        print(f"{r['implementation']:48s} {r['mb_per_s_per_core']:10.2f} {r['mb_per_s_wall']:10.2f} "
              f"{r['tokens_per_s_per_core'] / 1e6:12.2f} {str(r['matches_reference']):>9s}")

    result = {
        "benchmark": "tokenizer",
        "command": "python bench/tokenizer.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                           vars(args).items() if k != "out"),
        "documents": len(texts),
        "text_bytes": n_bytes,
        "machine": {
            "processor": _cpu_model(),
            "cores": os.cpu_count(),
            "load_average_1min_at_start": round(load_before[0], 2),
            "python": platform.python_version(),
        },
        "packages": {
            name: _version(name) for name in ("pyrwkv-tokenizer", "rwkv-tokenizer", "rwkv", "zstandard")
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    if mismatched:
        raise SystemExit(f"ids differ from the reference: {mismatched}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()

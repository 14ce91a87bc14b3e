"""RNN-mode inference: token-by-token equals the parallel forward, memory does not grow, sampling rules."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rwkv5.config import ModelConfig
from rwkv5.errors import ConfigError
from rwkv5.infer import EOD_ID, HostEmbedding, embedding_on_host, generate, prefill, sample_logits, step

# A small vocabulary keeps the head cheap; 260 covers the byte-level stand-in tokenizer below.
CFG = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=260)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class ByteTokenizer:
    """Stand-in tokenizer for these tests only: one id per UTF-8 byte (ids 1..256)."""

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 1 for i in ids if 0 < i <= 256).decode(errors="replace")


@pytest.fixture
def model(random_model):
    return random_model(CFG)


def test_token_by_token_matches_parallel(model):
    ids = torch.randint(0, CFG.vocab_size, (1, 37))
    with torch.no_grad():
        parallel = model(ids)[0]  # (T, V)
    state, rows = None, []
    for token in ids[0].tolist():
        logits, state = step(model, token, state)
        rows.append(logits)
    assert rel_err(torch.stack(rows), parallel) < 1e-5


def test_prefill_in_pieces_keeps_state_size_and_matches_one_shot(model):
    ids = torch.randint(0, CFG.vocab_size, (1, 300))
    with torch.no_grad():
        ref_logits, ref_state = model(ids, return_state=True)
    expected_bytes = CFG.n_layer * (2 * CFG.n_embd * 4 + CFG.n_head * CFG.head_size**2 * 4)

    state, sizes = None, []
    for piece in ids[0].split(70):  # 4 pieces of 70 and one of 20, each prefilled in chunks of 32
        logits, state = prefill(model, piece.tolist(), state, chunk_len=32)
        sizes.append(state.nbytes())
    assert sizes == [expected_bytes] * len(sizes)
    assert rel_err(logits, ref_logits[0, -1]) < 1e-5
    assert rel_err(state.wkv, ref_state.wkv) < 1e-5
    assert rel_err(state.att_shift, ref_state.att_shift) < 1e-5
    assert rel_err(state.ffn_shift, ref_state.ffn_shift) < 1e-5


def test_prefill_reads_lazily_from_an_iterator(model):
    ids = torch.randint(0, CFG.vocab_size, (50,)).tolist()
    consumed = []

    def lazy():
        for i in ids:
            consumed.append(i)
            yield i

    chunks_seen = []
    original_forward = model.forward

    def spy(idx, *args, **kwargs):
        chunks_seen.append((idx.shape[1], len(consumed)))
        return original_forward(idx, *args, **kwargs)

    model.forward = spy
    logits, _ = prefill(model, lazy(), chunk_len=16)
    del model.forward
    # Each call saw only the ids of its own chunk: the iterator was not drained up front.
    assert chunks_seen == [(16, 16), (16, 32), (16, 48), (2, 50)]
    ref, _ = prefill(model, torch.tensor(ids), chunk_len=50)
    assert rel_err(logits, ref) < 1e-5


def test_prefill_rejects_empty_input(model):
    with pytest.raises(ConfigError, match="at least one"):
        prefill(model, [])


def test_sampling_greedy_and_top_p():
    logits = torch.tensor([0.0, 3.0, 2.5, -1.0, 1.0])
    assert sample_logits(logits, temperature=0) == 1
    # top_p small enough: only the most likely token survives.
    draws = {sample_logits(logits, top_p=1e-3, generator=torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws == {1}
    # probs ~ [.03, .53, .32, .01, .09]: top_p 0.8 keeps exactly the two most likely tokens.
    gen = torch.Generator().manual_seed(0)
    draws = [sample_logits(logits, top_p=0.8, generator=gen) for _ in range(300)]
    assert set(draws) == {1, 2}


def test_sampling_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(1000)
    a = [sample_logits(logits, 1.0, 0.9, torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [sample_logits(logits, 1.0, 0.9, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b
    gen = torch.Generator().manual_seed(7)
    assert len({sample_logits(logits, 1.0, 1.0, gen) for _ in range(20)}) > 1


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_sampling_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        sample_logits(torch.zeros(4), **kwargs)


def test_generate_is_seeded_and_bounded(model):
    tok = ByteTokenizer()
    a = list(generate(model, tok, "hello", max_new_tokens=12, seed=3, stop_at_eod=False))
    b = list(generate(model, tok, "hello", max_new_tokens=12, seed=3, stop_at_eod=False))
    assert a == b and len(a) == 12
    assert all(0 <= t < CFG.vocab_size for t in a)


def test_generate_continues_a_prefilled_context(model):
    tok = ByteTokenizer()
    whole = list(generate(model, tok, "long context. prompt", 8, temperature=0, stop_at_eod=False))
    context = prefill(model, tok.encode("long context."), chunk_len=4)
    split = list(generate(model, tok, " prompt", 8, temperature=0, context=context, stop_at_eod=False))
    assert split == whole


def test_generate_stops_at_end_of_document(model):
    with torch.no_grad():  # make the end-of-document id the only likely token
        model.ln_out.weight.zero_()
        model.ln_out.bias.fill_(1.0)
        model.head.weight.zero_()
        model.head.weight[EOD_ID] = 1.0
    tok = ByteTokenizer()
    assert list(generate(model, tok, "hi", 5, temperature=0)) == []
    assert list(generate(model, tok, "hi", 5, temperature=0, stop_at_eod=False)) == [EOD_ID] * 5


def test_last_only_gives_the_last_row_of_the_full_logits(model):
    ids = torch.randint(0, CFG.vocab_size, (2, 23))
    with torch.no_grad():
        full, full_state = model(ids, return_state=True)
        last, last_state = model(ids, return_state=True, last_only=True)
    assert last.shape == (2, 1, CFG.vocab_size)
    assert rel_err(last, full[:, -1:]) < 1e-6
    assert torch.equal(last_state.wkv, full_state.wkv)


def test_prefill_runs_the_head_on_one_position_per_chunk(model):
    head_rows = []
    hook = model.head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[1]))
    ids = torch.randint(0, CFG.vocab_size, (1, 70))
    logits, _ = prefill(model, ids[0], chunk_len=32)
    hook.remove()
    assert head_rows == [1, 1, 1]  # chunks of 32, 32 and 6 tokens
    with torch.no_grad():
        assert rel_err(logits, model(ids)[0, -1]) < 1e-5


def test_embedding_on_host_gives_the_same_logits(random_model):
    ids = torch.randint(0, CFG.vocab_size, (90,))
    model = random_model(CFG).to(torch.bfloat16)
    want, want_state = prefill(model, ids, chunk_len=32)
    assert embedding_on_host(model) is model and isinstance(model.emb, HostEmbedding)
    embedding_on_host(model)  # a second call keeps the one wrapper
    assert isinstance(model.emb.inner, torch.nn.Embedding)
    got, got_state = prefill(model, ids, chunk_len=32)
    assert torch.equal(got, want) and torch.equal(got_state.wkv, want_state.wkv)


def test_host_embedding_takes_casts_but_not_moves(random_model):
    model = embedding_on_host(random_model(CFG))
    model.to(torch.float64)
    assert model.emb.inner.weight.dtype == torch.float64 and model.blocks[0].ln1.weight.dtype == torch.float64
    model.to("meta")  # any device other than the host: the blocks go, the table stays
    assert model.blocks[0].att.key.weight.device.type == "meta"
    assert model.emb.inner.weight.device.type == "cpu" and model.emb.inner.weight.dtype == torch.float64


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """`rwkv5 init --preset tiny`: a freshly initialised checkpoint, as a user would make one."""
    from typer.testing import CliRunner

    from rwkv5_app.cli import app

    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    result = CliRunner().invoke(app, ["init", "--preset", "tiny", "--out", str(path)])
    assert result.exit_code == 0, result.output
    assert str(path) in result.stdout
    return path


def run_cli(*args):
    from typer.testing import CliRunner

    from rwkv5_app.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_init_writes_a_loadable_tiny_checkpoint(tiny_ckpt):
    from rwkv5.checkpoint import read_checkpoint
    from rwkv5.config import model_preset

    _, config, metadata = read_checkpoint(tiny_ckpt)
    assert config == model_preset("tiny")
    assert metadata["tokens_seen"] == 0


def test_cli_generate_on_fresh_tiny_model(tiny_ckpt):
    args = ["generate", "--ckpt", tiny_ckpt, "--prompt", "Hello", "--max-tokens", 6, "--seed", 1]
    first, second = run_cli(*args), run_cli(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() and first.stdout == second.stdout  # tokens came out, reproducibly


def test_cli_generate_streams_a_context_file(tiny_ckpt, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text("A line of context.\n" * 200 + "no newline at the end")
    result = run_cli("generate", "--ckpt", tiny_ckpt, "--context-file", context, "--max-tokens", 3, "--seed", 0)
    assert result.exit_code == 0, result.output


def _garbage(path):
    path.write_bytes(b"\x00" * 64)
    return path


@pytest.mark.parametrize(
    "make, message",
    [(lambda p: p, "no such checkpoint file"), (_garbage, "corrupt or truncated")],
    ids=["missing", "corrupt"],
)
def test_cli_generate_fails_in_one_line_naming_the_file(tmp_path, make, message):
    path = make(tmp_path / "model.safetensors")
    result = run_cli("generate", "--ckpt", path, "--prompt", "x")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0] and message in lines[0]


def test_cli_generate_missing_context_file(tiny_ckpt, tmp_path):
    result = run_cli("generate", "--ckpt", tiny_ckpt, "--context-file", tmp_path / "absent.txt")
    assert result.exit_code == 1
    assert "error: generate.context_file" in result.stderr and "absent.txt" in result.stderr


def test_iter_file_ids_splits_after_line_breaks(tmp_path):
    from rwkv5.infer import iter_file_ids

    text = "first line\nsecond line is longer\n\nthird ünïcode line\nlast"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    tok = ByteTokenizer()
    for block in (1, 7, 16, 1000):
        assert list(iter_file_ids(path, tok, block_chars=block)) == tok.encode(text)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while active and that are still alive (views count once)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is None or id(storage) in inputs or hasattr(storage, "_counted"):
                continue
            storage._counted = True
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, storage.nbytes())
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def test_prefill_memory_beyond_the_state_does_not_grow_with_depth(random_model):
    """Each extra layer adds its share of the state and nothing of a chunk's activations (a view of a layer's
    `T x C` input kept in the returned state once did: 0.5 GB for the 7B at chunk 1024)."""
    ids = torch.randint(0, CFG.vocab_size, (128,))
    peaks, per_layer = {}, None
    for n_layer in (2, 6):
        model = random_model(CFG.model_copy(update={"n_layer": n_layer}))
        _, state = prefill(model, ids[:64], chunk_len=64)  # a state of our own, then two chunks of 64
        with _LiveBytes() as live:
            prefill(model, ids[64:], state, chunk_len=32)
        peaks[n_layer], per_layer = live.peak, state.nbytes() // n_layer
    # 4 more layers: 4 more layers of the new state (18 KiB); leaked chunk inputs would be 16 KiB per layer.
    assert peaks[6] - peaks[2] <= 4 * per_layer + 1024

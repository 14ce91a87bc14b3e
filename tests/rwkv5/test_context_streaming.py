"""`rwkv5 generate --context-file`: a streamed context gives what the whole context at once gives, in bounded memory."""

from __future__ import annotations

import pytest
import torch

from rwkv5.config import ModelConfig
from rwkv5.infer import generate, iter_file_ids, prefill
from tests.support.byte_tokenizer import ByteTokenizer

CFG = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=260)


def _context_text(lines: int) -> str:
    return "".join(f"line {i}: the state carries what came before.\n" for i in range(lines))


def test_streamed_context_file_equals_whole_context(random_model, tmp_path):
    model = random_model(CFG)
    tok = ByteTokenizer()
    path = tmp_path / "context.txt"
    path.write_text(_context_text(30))
    streamed = prefill(model, iter_file_ids(path, tok, block_chars=100), chunk_len=64)
    ids = torch.tensor(tok.encode(path.read_text()))
    with torch.no_grad():
        logits, state = model(ids[None], return_state=True)  # the whole context in one call
    whole = (logits[0, -1].float(), state)
    assert torch.allclose(streamed[0], whole[0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(streamed[1].wkv, whole[1].wkv, rtol=1e-4, atol=1e-5)
    kwargs = dict(prompt="Q:", max_new_tokens=12, temperature=0.0, stop_at_eod=False)
    assert list(generate(model, tok, context=streamed, **kwargs)) == list(generate(model, tok, context=whole, **kwargs))


def test_largest_activation_is_bounded_by_the_chunk_not_the_context(random_model):
    model = random_model(CFG)
    largest: list[int] = []

    def record(module, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        largest.append(max((o.numel() for o in outs if isinstance(o, torch.Tensor)), default=0))

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    peaks, sizes = {}, {}
    for n in (100, 1000):
        largest.clear()
        _, state = prefill(model, torch.randint(1, CFG.vocab_size, (n,)), chunk_len=32)
        peaks[n], sizes[n] = max(largest), state.nbytes()
    for h in hooks:
        h.remove()
    assert peaks[1000] == peaks[100] <= 32 * max(CFG.vocab_size, CFG.ffn)
    assert sizes[1000] == sizes[100]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from typer.testing import CliRunner

    from rwkv5_app.cli import app

    path = tmp_path_factory.mktemp("ctx") / "tiny.safetensors"
    assert CliRunner().invoke(app, ["init", "--preset", "tiny", "--out", str(path)]).exit_code == 0
    return path


def test_cli_context_file_matches_one_shot_greedy_generation(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from data_prep.tokenizer import load_tokenizer
    from rwkv5.checkpoint import load_checkpoint
    from rwkv5_app.cli import app
    from rwkv5.infer import step

    path = tmp_path / "context.txt"
    path.write_text(_context_text(60))  # several of the CLI's 256-token chunks
    result = CliRunner().invoke(app, ["generate", "--ckpt", str(tiny_checkpoint), "--context-file", str(path),
                                      "--max-tokens", "8", "--temperature", "0"])
    assert result.exit_code == 0, result.output

    tok = load_tokenizer()
    model = load_checkpoint(str(tiny_checkpoint), "cpu", torch.float32)[0].eval()
    ids = torch.tensor(tok.encode(path.read_text()))
    assert len(ids) > 2 * 256
    with torch.no_grad():
        logits, state = model(ids[None], return_state=True)
    logits, expected = logits[0, -1], []
    for _ in range(8):
        token = int(logits.argmax())
        if token == 0:
            break
        expected.append(token)
        logits, state = step(model, token, state)
    assert result.stdout.rstrip("\n") == tok.decode(expected).rstrip("\n")

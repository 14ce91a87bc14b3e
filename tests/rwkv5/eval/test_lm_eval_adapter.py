"""lm-eval adapter: requests answered in RNN mode equal one parallel pass and `rwkv5 eval`'s LAMBADA numbers; the
CLI wrapper runs local tasks, falls back to the CPU without CUDA and fails in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from rwkv5.config import ModelConfig  # noqa: E402
from rwkv5.eval.lambada import SHIPPED_LAMBADA, lambada_eval, read_lambada  # noqa: E402
from rwkv5.eval.lm_eval_adapter import RWKV5LM  # noqa: E402
from tests.support.byte_tokenizer import ByteTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
LAMBADA = SHIPPED_LAMBADA
CFG = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=260)


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V)


@pytest.fixture
def lm(random_model):
    return RWKV5LM(model=random_model(CFG), tokenizer=ByteTokenizer(), chunk_len=8)


def test_loglikelihood_equals_parallel_pass(lm):
    tok = ByteTokenizer()
    pairs = [("The quick brown", " fox jumps over"), ("The quick brown", " cat"), ("", "hello")]
    got = lm.loglikelihood([_req("loglikelihood", *p) for p in pairs], disable_tqdm=True)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        ctx = [0] + tok.encode(context)  # every context follows the end-of-document token
        cont = tok.encode(continuation)
        logp = _logprobs(lm.model, ctx + cont[:-1])[len(ctx) - 1 :]
        assert ll == pytest.approx(sum(float(logp[i, t]) for i, t in enumerate(cont)), rel=1e-5)
        assert greedy == all(int(logp[i].argmax()) == t for i, t in enumerate(cont))


def test_loglikelihood_rolling_scores_every_token_once(lm):
    text = "A document longer than one chunk of eight tokens."
    (ll,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)], disable_tqdm=True)
    ids = ByteTokenizer().encode(text)
    logp = _logprobs(lm.model, [0] + ids[:-1])
    assert ll == pytest.approx(sum(float(logp[i, t]) for i, t in enumerate(ids)), rel=1e-5)


def test_generate_until_is_greedy_and_stops(lm):
    tok = ByteTokenizer()
    context = "Once upon a time"
    ids = [0] + tok.encode(context)
    expected = []
    for _ in range(6):
        nxt = int(_logprobs(lm.model, ids + expected)[-1].argmax())
        expected.append(nxt)
    (free,) = lm.generate_until([_req("generate_until", context, {"until": [], "max_gen_toks": 6})],
                                disable_tqdm=True)
    assert free == tok.decode(expected)
    stop = free[2:4] if len(free) >= 4 else free[-1:]
    (cut,) = lm.generate_until([_req("generate_until", context, {"until": [stop], "max_gen_toks": 6})],
                               disable_tqdm=True)
    assert cut == free.split(stop, 1)[0]


TASKS = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""


def test_lambada_numbers_equal_rwkv5_eval(lm, tmp_path):
    """The same passages through lm-eval's loglikelihood requests and `rwkv5 eval`'s LAMBADA: same numbers."""
    data = tmp_path / "lambada_slice.jsonl"
    with open(LAMBADA, encoding="utf-8") as f:
        data.write_text("".join(next(f) for _ in range(4)), encoding="utf-8")
    pairs = read_lambada(data)
    got = lm.loglikelihood([_req("loglikelihood", *p) for p in pairs], disable_tqdm=True)
    ours = lambada_eval(lm.model, ByteTokenizer().encode, data, chunk_len=8)
    assert math.exp(-sum(ll for ll, _ in got) / len(got)) == pytest.approx(ours.ppl, rel=1e-5)
    assert sum(greedy for _, greedy in got) / len(got) == ours.accuracy


def test_cuda_device_without_cuda_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    """lm-eval passes device="cuda:0" unless told otherwise; a machine without CUDA runs on the CPU."""
    from rwkv5.checkpoint import save_checkpoint
    from rwkv5.model import RWKV5

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(RWKV5(CFG), ckpt)
    lm = RWKV5LM(checkpoint=str(ckpt), tokenizer=ByteTokenizer(), device="cuda:0")
    assert lm.device.type == "cpu"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "running on the CPU" in warning[0]


def test_cli_failure_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv5.eval.lm_eval_adapter", "--model", "rwkv5", "--model_args",
         f"checkpoint={tmp_path / 'absent.safetensors'}", "--tasks", "lambada_openai", "--device", "cpu"],
        env=os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, cwd=ROOT, capture_output=True,
        text=True, timeout=600,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert line.startswith("rwkv5-lm-eval: error: CheckpointError:") and "absent.safetensors" in line


@pytest.mark.slow
def test_cli_wrapper_runs_local_tasks_on_a_tiny_checkpoint(tmp_path):
    """`python -m rwkv5.eval.lm_eval_adapter --model rwkv5 ...` (= `rwkv5-lm-eval`) on three local task files,
    as typed: without `--device` (on a machine without CUDA, the CPU with one warning)."""
    from rwkv5.checkpoint import save_checkpoint
    from rwkv5.config import model_preset
    from rwkv5.model import RWKV5

    data = tmp_path / "lambada_slice.jsonl"
    with open(LAMBADA, encoding="utf-8") as f:
        data.write_text("".join(next(f) for _ in range(3)), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ll.yaml").write_text(TASKS.format(name="rwkv5_lambada_local", data=data) + """\
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' ' + text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (tasks / "rolling.yaml").write_text(TASKS.format(name="rwkv5_rolling_local", data=data) + """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    (tasks / "gen.yaml").write_text(TASKS.format(name="rwkv5_gen_local", data=data) + """\
output_type: generate_until
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' ' + text.split(' ')[-1]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
""")
    ckpt = tmp_path / "tiny.safetensors"
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                        "HF_HOME": str(tmp_path / "hf")}
    save_checkpoint(RWKV5(model_preset("tiny")), ckpt)  # what `rwkv5 init --preset tiny` writes
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv5.eval.lm_eval_adapter", "--model", "rwkv5", "--model_args", f"checkpoint={ckpt}",
         "--tasks", "rwkv5_lambada_local,rwkv5_rolling_local,rwkv5_gen_local", "--include_path", str(tasks),
         "--output_path", str(out)],  # no --device: lm-eval asks for cuda:0, which this CPU machine lacks
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    if not torch.cuda.is_available():
        assert proc.stderr.count("running on the CPU") == 1
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    lam = results["rwkv5_lambada_local"]
    assert 0 <= lam["acc,none"] <= 1 and math.isfinite(lam["perplexity,none"]) and lam["perplexity,none"] > 1
    assert math.isfinite(results["rwkv5_rolling_local"]["word_perplexity,none"])
    assert results["rwkv5_rolling_local"]["bits_per_byte,none"] > 0
    assert results["rwkv5_gen_local"]["exact_match,none"] in (0.0, 1 / 3, 2 / 3, 1.0)

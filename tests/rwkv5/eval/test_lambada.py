"""LAMBADA in RNN mode equals scoring the whole passage at once; `rwkv5 eval` prints, writes JSON, logs MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv5.config import ModelConfig
from rwkv5.errors import DataError
from rwkv5.eval.lambada import SHIPPED_LAMBADA, fetch_lambada, lambada_eval, read_lambada
from tests.support.byte_tokenizer import ByteTokenizer

LAMBADA = SHIPPED_LAMBADA
CFG = ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=260)


def _slice(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "lambada_slice.jsonl"
    with open(LAMBADA, encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return path


def test_shipped_lambada_is_the_openai_test_set(tmp_path):
    pairs = read_lambada(fetch_lambada("shipped", tmp_path))
    assert read_lambada("shipped", limit=2) == pairs[:2]
    assert len(pairs) == 5153 and all(target.startswith(" ") and " " not in target[1:] for _, target in pairs)


def test_rnn_mode_scores_equal_one_parallel_pass(random_model, tmp_path):
    model = random_model(CFG)
    tok = ByteTokenizer()
    path = _slice(tmp_path, 3)
    pairs = read_lambada(path)
    nll, correct = 0.0, 0
    for context, target in pairs:
        ctx, tgt = [0] + tok.encode(context), tok.encode(target)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + tgt[:-1]]))[0].double(), -1)  # (T, V)
        rows = logp[len(ctx) - 1 :]  # the rows that predict the target's tokens
        nll -= sum(float(rows[i, t]) for i, t in enumerate(tgt))
        correct += all(int(rows[i].argmax()) == t for i, t in enumerate(tgt))
    result = lambada_eval(model, tok.encode, path, chunk_len=16)
    assert result.samples == 3
    assert result.ppl == pytest.approx(math.exp(nll / 3), rel=1e-4)
    assert result.accuracy == correct / 3


def test_a_model_that_knows_the_answer_scores_full_marks(tmp_path):
    """A stand-in 'model' that always predicts the next byte of the passage: accuracy 1, perplexity ~1."""
    text = "the cat sat on the mat"
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    ids = [0] + ByteTokenizer().encode(text)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx, state=None, return_state=False, last_only=False):
            pos = 0 if state is None else state
            logits = torch.full((1, idx.shape[1], 260), -30.0)
            for j in range(idx.shape[1]):
                logits[0, j, ids[min(pos + j + 1, len(ids) - 1)]] = 30.0
            if last_only:
                logits = logits[:, -1:]
            return (logits, pos + idx.shape[1]) if return_state else logits

    result = lambada_eval(Oracle(), ByteTokenizer().encode, path, chunk_len=5)
    assert result.accuracy == 1.0 and result.ppl == pytest.approx(1.0, abs=1e-6)


def test_read_lambada_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine passage here"}) + "\n" + json.dumps({"text": "oneword"}) + "\n")
    assert read_lambada(path, limit=1) == [("fine passage", " here")]
    with pytest.raises(DataError, match=r"bad.jsonl:2: passage has no last word"):
        read_lambada(path)
    with pytest.raises(DataError, match="not found"):
        read_lambada(tmp_path / "absent.jsonl")


def _validation_split(root: Path) -> Path:
    from data_prep.shards import ShardWriter, write_manifest
    from data_prep.tokenizer import load_tokenizer

    fp = load_tokenizer().fingerprint
    rng = np.random.default_rng(0)
    with ShardWriter(root, "val", fp, shard_tokens=400) as w:
        for i in range(12):
            doc = rng.integers(1, 65530, size=60).astype(np.uint16)
            doc[-1] = 0
            w.add(doc, ["RedPajamaC4", "RedPajamaGithub"][i % 2])
    write_manifest(root, fp, w.commit())
    return root


@pytest.mark.slow
def test_cli_eval_prints_writes_json_and_logs_to_mlflow(tmp_path, mlflow_server):
    import mlflow
    from typer.testing import CliRunner

    from rwkv5_app.cli import app

    ckpt = tmp_path / "tiny.safetensors"
    runner = CliRunner()
    assert runner.invoke(app, ["init", "--preset", "tiny", "--out", str(ckpt)]).exit_code == 0
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.create_experiment("milestones-test")
    run_id = client.create_run(exp_id).info.run_id  # stands in for the milestone's run
    out = tmp_path / "report.json"
    result = runner.invoke(app, [
        "eval", str(ckpt), "--lambada", str(_slice(tmp_path, 4)), "--validation", str(_validation_split(tmp_path / "val")),
        "--limit", "3", "--out", str(out), "--mlflow-run-id", run_id, "--tracking-uri", mlflow_server,
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["lambada"]["samples"] == 3 and 0 <= report["lambada"]["accuracy"] <= 1
    assert math.isfinite(report["lambada"]["ppl"]) and report["lambada"]["ppl"] > 1
    assert set(report["validation"]["by_source"]) <= {"RedPajamaC4", "RedPajamaGithub"}
    assert report["validation"]["tokens"] == 3 * 128
    assert "lambada ppl" in result.stdout and f"{report['lambada']['ppl']:.3f}" in result.stdout
    logged = client.get_run(run_id).data.metrics
    assert logged["eval.lambada_ppl"] == pytest.approx(report["lambada"]["ppl"])
    assert logged["eval.val_loss"] == pytest.approx(report["validation"]["loss"])
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/report.json"]


def test_cli_eval_needs_something_to_do(tmp_path):
    from typer.testing import CliRunner

    from rwkv5_app.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "--lambada" in result.stderr


def test_deployments_score_lambada():
    """`tiny` milestones score the shipped LAMBADA (a few passages), `7b` the Hub's copy; the milestone event
    carries both settings to the `auto` deployment."""
    import yaml

    from rwkv5.eval.lambada import HUB_LAMBADA

    spec = yaml.safe_load((Path(__file__).resolve().parents[3] / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"] if d["entrypoint"] != "flows/longctx.py:longctx"}
    tiny, big = deployments["tiny"]["parameters"]["milestones"], deployments["7b"]["parameters"]["milestones"]
    assert tiny["lambada"] == "shipped" and tiny["eval_limit"] <= 32
    assert big["lambada"] == HUB_LAMBADA and "eval_limit" not in big and "finetune_steps" not in big
    assert 0 < tiny["finetune_steps"] < 10  # fewer than the flow's default: ten milestone runs go in a row
    (trigger,) = deployments["auto"]["triggers"]
    assert trigger["parameters"]["settings"] == "{{ event.payload.settings }}"  # LAMBADA settings travel in it

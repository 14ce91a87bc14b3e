"""The milestone table: which complete milestones still need a release, in what order, and where they go."""

from __future__ import annotations

import json


def test_unreleased_milestones_are_found_in_order(tmp_path):
    """Enqueued milestone runs may start out of order; the run holding the slot releases every ready one."""
    from rwkv5.release.milestones import MilestoneTable, release_order
    from rwkv5.train.milestones import completed, milestone_dir, run_dir_of

    run_dir = tmp_path / "checkpoints" / "demo"
    for index in (4, 2, 1, 3):
        folder = milestone_dir(run_dir, index)
        folder.mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps(
            {"milestone": index, "percent": 10 * index, "step": 4 * index, "tokens_seen": 4096 * index,
             "path": str(folder / "model.safetensors")}))
    milestone_dir(run_dir, 5).mkdir()  # consolidating: no done.json yet
    assert run_dir_of(milestone_dir(run_dir, 3) / "model.safetensors") == run_dir
    table = MilestoneTable(tmp_path / "milestones" / "demo")
    table.write({"percent": 10})  # 10% is released already

    pending = table.unreleased(completed(run_dir))
    assert [(row["percent"], row["step"]) for row in pending] == [(20, 8), (30, 12), (40, 16)]
    own = {"percent": 30, "step": 12, "tokens_seen": 0, "path": "event"}
    assert [info["percent"] for info in release_order(pending, own)] == [20, 30, 40]
    assert release_order(pending, own)[1] is own  # its own milestone as the event describes it
    for percent in (20, 30, 40):
        table.write({"percent": percent})
    assert table.unreleased(completed(run_dir)) == []
    assert [row["percent"] for row in table.rows()] == [10, 20, 30, 40]


def test_release_targets_and_registry(monkeypatch, tmp_path):
    from rwkv5.release.milestones import release_target
    from rwkv5.tracking import registry_name

    assert release_target(None, tmp_path, 10) == str(tmp_path / "m010")
    assert release_target("hf://org/model", tmp_path, 20) == "hf://org/model@m020"
    assert release_target("s3://bucket/releases/", tmp_path, 100) == "s3://bucket/releases/m100"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert registry_name("demo", "/state/releases/demo/m010") is None
    assert registry_name("demo", "file:///state/releases/demo/m010") is None
    assert registry_name("demo", "s3://bucket/releases/m010") == "rwkv5-demo"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert registry_name("demo", "s3://bucket/releases/m010") is None


def test_a_milestone_row_shows_the_heldout_chat_loss_before_and_after():
    """The fine-tune's effect is the held-out chat loss of base and fine-tune, not its first and last batch."""
    from rwkv5.release.milestones import milestone_row

    info = {"percent": 20, "step": 8, "tokens_seen": 32768, "path": "m002/model.safetensors"}
    finetune = {"checkpoint": "ft/model.safetensors", "first_loss": 7.69, "last_loss": 8.48, "steps": 30}
    evals = {variant: {"validation": {"loss": loss}, "chat": {"loss": chat, "samples": 32, "tokens": 4000}}
             for variant, loss, chat in (("base", 6.123456, 7.74123), ("finetune", 6.2, 7.33456))}
    row = milestone_row(info, finetune, evals, "file:///releases/m020")
    assert row == {"percent": 20, "step": 8, "tokens_seen": 32768, "val_loss_base": 6.1235, "val_loss_finetune": 6.2,
                   "finetune_steps": 30, "chat_loss_before": 7.7412, "chat_loss_after": 7.3346,
                   "release": "file:///releases/m020"}
    without_chat = {variant: {"validation": report["validation"]} for variant, report in evals.items()}
    assert "chat_loss_before" not in milestone_row(info, finetune, without_chat, "x")

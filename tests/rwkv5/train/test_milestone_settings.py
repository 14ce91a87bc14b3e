"""Milestone settings (one typed object, validated once) and where milestone runs go: `shared` or `dedicated`."""

from __future__ import annotations

import pytest

from rwkv5.errors import ConfigError
from rwkv5.train.milestone_settings import MilestoneSettings, place_milestones, settings_from


def test_settings_come_from_a_flow_parameter_or_an_event_payload():
    settings = settings_from({"finetune_workers": 8, "chat_data": "hf://datasets/PygmalionAI/PIPPA/x.jsonl"})
    assert settings.finetune_workers == 8 and settings.finetune_steps == MilestoneSettings().finetune_steps
    assert settings_from(settings.model_dump()) == settings  # the event payload round trip
    assert settings_from(None) == MilestoneSettings()
    run = settings.for_run("cerebras/SlimPajama-627B", pretrain_gpus_per_worker=1)
    assert (run.data_source, run.gpus_per_worker) == ("cerebras/SlimPajama-627B", 1)
    assert settings.model_copy(update={"gpus_per_worker": 0.5}).for_run("sample", 1).gpus_per_worker == 0.5


@pytest.mark.parametrize("bad, field", [({"finetune_steps": 0}, "milestones.finetune_steps"),
                                        ({"eval_limit": -1}, "milestones.eval_limit"),
                                        ({"gpus_per_worker": 1.5}, "milestones.gpus_per_worker"),
                                        ({"finetune_lr": 0}, "milestones.finetune_lr"),
                                        ({"lambda": "x"}, "milestones.lambda")])
def test_bad_settings_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        settings_from(bad)


def test_auto_is_dedicated_only_where_pretraining_and_a_fine_tune_fit_at_once():
    node8 = place_milestones("auto", 8, 1, 8, 1, cluster_gpus=8, cluster_cpus=128)  # the 7b run on one node
    assert node8.mode == "shared"
    assert "has 8 GPUs" in node8.detail and "both at once need 16 GPUs" in node8.detail
    assert place_milestones("auto", 8, 1, 8, 1, cluster_gpus=16, cluster_cpus=256).mode == "dedicated"
    assert place_milestones("auto", 1, 1, 1, 1, cluster_gpus=1, cluster_cpus=16).mode == "shared"  # pretrain/1gpu
    assert place_milestones("auto", 1, 0.5, 1, 0.5, cluster_gpus=1, cluster_cpus=16).mode == "dedicated"
    assert place_milestones("auto", 2, 0, 1, 0, cluster_gpus=0, cluster_cpus=2).mode == "shared"  # CPUs count too
    assert place_milestones("auto", 0, 0, 0, 0, cluster_gpus=None, cluster_cpus=None).mode == "dedicated"
    assert place_milestones("shared", 8, 1, 8, 1, cluster_gpus=64, cluster_cpus=512).mode == "shared"


def test_a_fine_tune_in_the_flow_process_counts_the_gpu_it_takes():
    """0 fine-tune workers on a GPU: no Ray resources, but the GPU it uses is one pretraining may hold."""
    one_gpu = place_milestones("auto", 1, 1, 0, 1, cluster_gpus=1, cluster_cpus=16)  # pretrain/1gpu
    assert one_gpu.mode == "shared"
    assert "a fine-tune 1 GPUs (the milestone flow's process)" in one_gpu.detail
    assert place_milestones("auto", 1, 1, 0, 1, cluster_gpus=2, cluster_cpus=16).mode == "dedicated"
    assert place_milestones("dedicated", 1, 1, 0, 1, cluster_gpus=1, cluster_cpus=16).mode is None
    assert place_milestones("auto", 2, 0, 0, 0, cluster_gpus=0, cluster_cpus=2).mode == "dedicated"  # CPU: no GPU


def test_what_cannot_fit_fails_with_one_line():
    dedicated = place_milestones("dedicated", 8, 1, 8, 1, cluster_gpus=8, cluster_cpus=128)
    assert dedicated.mode is None and "\n" not in dedicated.detail
    assert dedicated.detail.startswith("dedicated does not fit: the cluster has 8 GPUs")
    never = place_milestones("auto", 1, 1, 16, 1, cluster_gpus=8, cluster_cpus=128)
    assert never.mode is None and "never fits" in never.detail
    with pytest.raises(ConfigError, match="milestone_mode"):
        place_milestones("sometimes", 1, 1, 1, 1, cluster_gpus=8, cluster_cpus=8)

"""The launcher's resume guard on object storage (moto's S3 server)."""

from __future__ import annotations

import boto3
import pytest


def test_launcher_sees_checkpoints_on_the_store(s3_bucket, s3_server):
    from rwkv5.errors import ConfigError
    from rwkv5.train.launch import check_resume

    storage = f"s3://{s3_bucket}/runs"
    assert check_resume(storage, "fresh", resume=False) == []
    s3 = boto3.client("s3", endpoint_url=s3_server["client_kwargs"]["endpoint_url"])
    s3.put_object(Bucket=s3_bucket, Key="runs/old/step_00000004/trainer_state.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key="runs/old/step_00000006/ds/partial", Body=b"")  # upload in progress
    with pytest.raises(ConfigError, match="1 checkpoint.*step_00000004.*--resume"):
        check_resume(storage, "old", resume=False)
    assert check_resume(storage, "old", resume=True) == [f"{storage}/old/step_00000004"]


def test_gpus_per_worker_is_whole_gpus_or_a_fraction_of_one():
    from rwkv5.errors import ConfigError
    from rwkv5.train.launch import check_gpus_per_worker

    for fine in (0, 0.25, 0.5, 1, 2, 8.0):
        check_gpus_per_worker(fine)
    for bad in (-1, 1.5, 2.5):
        with pytest.raises(ConfigError, match="gpus_per_worker"):
            check_gpus_per_worker(bad)

"""Fixtures for the scale-out tests: an S3 bucket on the session's moto server, and a small token dataset."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """A fresh bucket on the moto server, with AWS_ENDPOINT_URL pointing pyarrow (and Ray workers) at it."""
    import boto3

    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    name = f"rwkv5-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    yield name
    if saved is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = saved


def documents(n_docs: int, seed: int):
    """Arithmetic id sequences below 400 (learnable in a few steps), each ending with the end-of-document id."""
    rng = np.random.default_rng(seed)
    for _ in range(n_docs):
        start, step, length = rng.integers(1, 300), rng.integers(1, 4), rng.integers(40, 400)
        yield np.append((start + step * np.arange(length)) % 400 + 1, 0).astype(np.uint16)


@pytest.fixture(scope="session")
def local_tokens(tmp_path_factory):
    """~90k tokens in shards of ~10k tokens (about 20 KiB each), written by data_prep's writer."""
    from data_prep.shards import write_token_dataset

    out = tmp_path_factory.mktemp("tokens")
    write_token_dataset(out, documents(400, seed=0), "synthetic-test", shard_tokens=10_000)
    return out

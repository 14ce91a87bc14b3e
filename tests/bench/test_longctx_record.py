"""The memory benches' CPU smoke mode and the longctx record built from their JSON (the device run's chain)."""

from __future__ import annotations

import json

import pytest

from bench import finetune_memory, infer_memory, longctx_record
from rwkv5.errors import ConfigError


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("longctx")
    infer_memory.main(["--device", "cpu", "--tiny", "--bits", "16", "4", "--chunk", "32", "48",
                       "--out", str(out / "infer.json")])
    finetune_memory.main(["--device", "cpu", "--tiny", "--out", str(out / "ft.json")])
    return out


def test_inference_record_names_its_options(records):
    record = json.loads((records / "infer.json").read_text())
    assert record["options"]["embedding"] == "host"
    assert record["options"]["chunk"] == {"16": 32, "4": 48}
    rows = {r["bits"]: r for r in record["results"]}
    # The embedding table is on the host: what the device holds is the rest (on a CPU run, all of it).
    assert rows[4]["weight_gb"] < rows[16]["weight_gb"] * 0.5
    assert all(c["finite"] for r in rows.values() for c in r["contexts"])


def test_longctx_record_combines_both(records, tmp_path):
    out = tmp_path / "longctx.json"
    record = longctx_record.main(["--finetune", str(records / "ft.json"), "--inference", str(records / "infer.json"),
                                  "--out", str(out)])
    assert json.loads(out.read_text()) == record
    assert record["card"] == "cpu" and record["peak_ratio"] is None  # no GPU, no peaks
    assert [r["bits"] for r in record["inference"]["rows"]] == [16, 4]
    assert record["finetune"]["peaks_bytes"].keys() == {"64", "512"}
    assert record["commands"][1].startswith("python3 bench/infer_memory.py --device cpu --tiny")
    assert record["commands"][2].startswith("python3 bench/longctx_record.py --finetune")


def test_longctx_record_refuses_a_swapped_file(records):
    with pytest.raises(ConfigError, match="ft.json: expected the record of bench .infer_memory."):
        longctx_record.main(["--finetune", str(records / "ft.json"), "--inference", str(records / "ft.json")])

"""infra/ray: the cluster launcher YAML and the KubeRay RayCluster pass Ray's own loaders (ray 2.60), and
carry the settings the pipeline relies on (image, shared storage, GPU counts, autoscaling bounds)."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

RAY_DIR = Path(__file__).resolve().parents[2] / "infra" / "ray"
ray = pytest.importorskip("ray")


def _launcher() -> dict:
    return yaml.safe_load((RAY_DIR / "cluster-aws.yaml").read_text())


def _kuberay() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((RAY_DIR / "raycluster.yaml").read_text()) if doc]


def _raycluster() -> dict:
    (cr,) = [d for d in _kuberay() if d["kind"] == "RayCluster"]
    return cr


def _prepared(config: dict) -> dict:
    """What `ray up` does before launching anything: merge provider defaults, then schema-validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _options(run_options: list[str]) -> list[str]:
    return [tok for opt in run_options for tok in shlex.split(opt)]


def _env(run_options: list[str]) -> dict[str, str]:
    toks = _options(run_options)
    return dict(toks[i + 1].split("=", 1) for i, t in enumerate(toks) if t in ("--env", "-e"))


def test_launcher_config_validates_with_gpu_workers_and_cpu_head():
    cfg = _prepared(_launcher())
    types = cfg["available_node_types"]
    head, gpu = types[cfg["head_node_type"]], types["gpu-h100"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge" and gpu["resources"]["GPU"] == 8
    assert "GPU" not in head["resources"] and head["resources"]["CPU"] == 0
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    assert gpu["max_workers"] * gpu["resources"]["GPU"] == 256
    # Ray's AWS defaults would pip-install a nightly Ray at boot; the image already has everything.
    assert cfg["setup_commands"] == [] and cfg["head_setup_commands"] == []
    assert any("prefect worker start" in c for c in cfg["head_start_ray_commands"])


def test_launcher_config_shares_storage_and_image():
    cfg = _prepared(_launcher())
    docker = cfg["docker"]
    assert docker["image"] == _raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    toks = _options(docker["run_options"])
    mounts = [toks[i + 1].split(":")[1] for i, t in enumerate(toks) if t in ("--volume", "-v")]
    env = _env(docker["run_options"])
    assert any(env["RWKV5_HOME"].startswith(m + "/") for m in mounts)  # state on the shared mount
    assert any("/fsx" in c and "mount" in c for c in cfg["initialization_commands"])
    worker_env = _env(docker["worker_run_options"])
    assert int(worker_env["RWKV5_SHARD_CACHE_BYTES"]) > 0 and worker_env["RWKV5_SHARD_CACHE"].startswith("/scratch")


def test_launcher_schema_rejects_a_misspelt_field():
    """The validation above is real: Ray's schema refuses unknown docker keys and a bad head type."""
    from jsonschema import ValidationError

    bad = _launcher()
    bad["docker"]["pull_before_runn"] = bad["docker"].pop("pull_before_run")
    with pytest.raises(ValidationError):
        _prepared(bad)
    bad = _launcher()
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared(bad)


def test_raycluster_translates_to_an_autoscaler_config():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = _raycluster()
    assert cr["apiVersion"] == "ray.io/v1" and cr["spec"]["rayVersion"] == ray.__version__
    assert cr["spec"]["enableInTreeAutoscaling"] is True
    # Ray's KubeRay translation, which also runs Ray's schema validation on its result.
    auto = _derive_autoscaling_config_from_ray_cr(cr)
    gpu = auto["available_node_types"]["gpu-h100"]
    assert gpu["resources"]["GPU"] == 8 and (gpu["min_workers"], gpu["max_workers"]) == (0, 32)
    assert auto["max_workers"] == 32 and auto["idle_timeout_minutes"] == 10
    head = auto["available_node_types"]["headgroup"]
    assert head["resources"].get("CPU", 0) == 0 and "GPU" not in head["resources"]


def test_raycluster_pods_mount_what_they_use():
    docs = _kuberay()
    cr = _raycluster()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    env = next(d for d in docs if d["kind"] == "ConfigMap")
    groups = [cr["spec"]["headGroupSpec"]] + cr["spec"]["workerGroupSpecs"]
    for group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert c["image"] and c["resources"]["limits"]
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert set(mounts.values()) <= set(volumes), f"{c['name']} mounts an undeclared volume"
            home_mount = [p for p in mounts if env["data"]["RWKV5_HOME"].startswith(p + "/")]
            assert home_mount, f"{c['name']}: RWKV5_HOME is not on a mounted volume"
            pvc = volumes[mounts[home_mount[0]]]["persistentVolumeClaim"]["claimName"]
            assert pvc in claims
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every node writes checkpoints there
    worker = cr["spec"]["workerGroupSpecs"][0]
    assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


def _docker_run(cfg: dict, as_head: bool) -> list[str]:
    """The `docker run` command line Ray's launcher renders for a head or worker node's container."""
    from ray.autoscaler._private.docker import docker_start_cmds

    docker = cfg["docker"]
    options = docker["run_options"] + docker.get("head_run_options" if as_head else "worker_run_options", [])
    return shlex.split(docker_start_cmds(cfg["auth"]["ssh_user"], docker["image"], cfg["file_mounts"],
                                         docker["container_name"], options, cfg["cluster_name"], "/root", "docker"))


def test_launcher_nodes_require_the_ray_token_from_the_operators_secrets_folder():
    cfg = _prepared(_launcher())
    for as_head in (True, False):
        argv = _docker_run(cfg, as_head)
        env = dict(argv[i + 1].split("=", 1) for i, t in enumerate(argv) if t in ("-e", "--env"))
        mounts = dict(argv[i + 1].split(":")[1::-1] for i, t in enumerate(argv) if t in ("-v", "--volume"))
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env, env
        token_dir = str(Path(env["RAY_AUTH_TOKEN_PATH"]).parent)
        assert token_dir in mounts, f"{env['RAY_AUTH_TOKEN_PATH']} is not on a mounted folder: {mounts}"
        # The folder is copied from the operator's machine, outside the repository: no committed file holds it.
        source = Path(cfg["file_mounts"][token_dir]).expanduser()
        assert not source.resolve().is_relative_to(RAY_DIR.parents[1]), source
    # Whatever talks to MLflow or Prefect starts with the credentials of the same folder in its environment.
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
              if "prefect " in c or "ray start --address" in c]
    assert len(starts) == 3
    for command in starts:
        assert f". {token_dir}/stack.env" in command and "set -a" in command, command


def _secret_ref(container: dict, name: str) -> dict | None:
    entry = next((e for e in container.get("env", []) if e["name"] == name), None)
    return entry and entry.get("valueFrom", {}).get("secretKeyRef")


def test_raycluster_containers_require_the_ray_token_from_a_secret():
    docs = _kuberay()
    cr = _raycluster()
    assert not [d for d in docs if d["kind"] == "Secret"], "secrets are created by the operator, not committed"
    groups = [cr["spec"]["headGroupSpec"]] + cr["spec"]["workerGroupSpecs"]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    containers.append({"name": "autoscaler", **cr["spec"]["autoscalerOptions"]})
    assert {"ray-head", "prefect-worker", "ray-worker", "autoscaler"} <= {c["name"] for c in containers}
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        ref = _secret_ref(c, "RAY_AUTH_TOKEN")
        assert ref and ref["key"] and ref["name"], f"{c['name']}: RAY_AUTH_TOKEN not from a Secret"
        assert "value" not in env["RAY_AUTH_TOKEN"]
    # Prefect and MLflow credentials: from a Secret wherever a pipeline process runs (flow runs, Ray Train workers).
    for c in containers:
        if c["name"] in ("prefect-worker", "ray-worker"):
            assert {"name": "rwkv5-stack-credentials"} in [e.get("secretRef") for e in c["envFrom"]], c["name"]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert not {k for k in config_map if "AUTH" in k or "PASSWORD" in k or "TOKEN" in k}
    # Still a valid RayCluster for Ray's own translation.
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    _derive_autoscaling_config_from_ray_cr(cr)

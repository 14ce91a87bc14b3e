"""Checks that a pretraining run can start, run before it downloads or trains anything.

Each check is a function returning one `Check` (a row of the preflight table). `run_preflight` runs the ones a
run needs, in order, and `Preflight.failures()` gives one line per failed check. The checks only read, apart
from probe files they write and delete again. A CPU run without Ray workers (`workers=0`, the tiny demo)
never starts Ray: its paths are probed in this process.

    report = run_preflight(RunNeeds(workers=8, gpus_per_worker=1, storage="/shared/ckpt",
                                    data_dir="/shared/data", state_dir="/shared", source="cerebras/SlimPajama-627B"))
    report.raise_if_failed()
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from rwkv5.errors import Rwkv5Error
from rwkv5.train.milestone_settings import Placement, place_milestones

__all__ = ["Check", "Preflight", "PreflightFailed", "RunNeeds", "cluster_resources", "shared_paths", "disk_space",
           "estimate_bytes", "hub_access", "kernel_build", "milestone_placement", "batch_split",
           "stack_credentials", "run_preflight"]

# SlimPajama-627B per split: (compressed bytes on the Hub, tokens). Shards hold uint16 ids: 2 bytes a token.
SLIMPAJAMA_SPLITS = {"train": (895e9, 627e9), "validation": (1e9, 0.5e9), "test": (1e9, 0.5e9)}
_TOKENS_PER_RAW_BYTE = 627e9 / 895e9  # zstd-compressed jsonl -> tokens, measured on SlimPajama as a whole
_SAMPLE_BYTES = 200e6  # the offline sample: a few MB of files and shards; a generous bound


class PreflightFailed(Rwkv5Error):
    """At least one preflight check failed; the message has one line per failed check."""


@dataclass(frozen=True)
class Check:
    """One preflight result.

    Args:
        name: what was checked (`gpus`, `shared paths`, `disk`, `hub`, `cuda kernel`, `credentials`).
        status: "ok", "failed" or "skipped" (not needed by this run, or impossible after an earlier failure).
        detail: one line: what was found, next to what the run needs.
        seconds: how long the check took.
    """

    name: str
    status: str
    detail: str
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def row(self) -> dict:
        return {"check": self.name, "result": self.status, "detail": self.detail, "seconds": round(self.seconds, 2)}


@dataclass(frozen=True)
class RunNeeds:
    """What a pretraining run will need, from the flow's parameters.

    Args:
        workers: Ray Train workers; 0 trains in this process (no Ray).
        gpus_per_worker: GPUs each; 0 is a CPU run.
        storage: checkpoint root every worker writes.
        data_dir: where the tokens go, which every worker reads.
        state_dir: the local folder that receives the download and the shards.
        source: "sample", a Hub repo id, or a local/fsspec folder.
        revision: the Hub revision. Default: "main".
        splits: splits that will be downloaded. Default: train and validation.
        fraction: fraction of the files. Default: 1.0.
        milestone_mode: where milestone runs go: "auto", "shared" or "dedicated"
            (`rwkv5.train.milestone_settings`). Default: "auto".
        finetune_workers: Ray Train workers of each milestone fine-tune; 0 = the milestone flow's process.
        finetune_gpus_per_worker: GPUs each of those workers asks for.
        micro_batch, global_batch: the run preset's batch (sequences per worker per micro-step, per optimizer
            step); 0 skips the batch check.
    """

    workers: int
    gpus_per_worker: float
    storage: str
    data_dir: str
    state_dir: str
    source: str
    revision: str = "main"
    splits: tuple[str, ...] = ("train", "validation")
    fraction: float = 1.0
    milestone_mode: str = "auto"
    finetune_workers: int = 0
    finetune_gpus_per_worker: float = 0.0
    micro_batch: int = 0
    global_batch: int = 0


@dataclass
class Preflight:
    """The checks of one run, in the order they ran, and where its milestones go (None when that check failed)."""

    checks: list[Check]
    placement: Placement | None = None

    @property
    def milestone_mode(self) -> str | None:
        """"shared" or "dedicated"; None when the milestone check failed."""
        return self.placement.mode if self.placement else None

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.failed]

    def rows(self) -> list[dict]:
        return [c.row() for c in self.checks]

    def raise_if_failed(self) -> None:
        failures = self.failures()
        if failures:
            raise PreflightFailed("preflight failed, nothing was downloaded:\n" + "\n".join(failures))


def _timed(name: str, fn, *args) -> Check:
    start = time.perf_counter()
    status, detail = fn(*args)
    return Check(name, status, detail, time.perf_counter() - start)


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def _cluster_resources(workers: int, gpus_per_worker: float, total: dict, most: dict | None) -> tuple[str, str]:
    have_gpus, have_cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
    if most:  # an autoscaling cluster starts GPU nodes when training asks: count what it may grow to
        have_gpus, have_cpus = max(have_gpus, int(most.get("GPU", 0))), max(have_cpus, int(most.get("CPU", 0)))
    need_gpus = workers * gpus_per_worker
    found = f"Ray cluster has {have_gpus} GPUs and {have_cpus} CPUs" + (" (autoscaler maximum)" if most else "")
    if have_gpus < need_gpus:
        return "failed", f"{found}; the run needs {need_gpus:g} GPUs ({workers} workers x {gpus_per_worker:g})"
    if have_cpus < workers:
        return "failed", f"{found}; the run needs {workers} CPUs (one per worker)"
    return "ok", f"{found}; the run needs {need_gpus:g} GPUs and {workers} CPUs"


def _autoscaler_maximum() -> dict | None:
    """The most resources the cluster's autoscaler may start (its node groups' max counts), None without one."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # a private Ray API: without it, the check counts the nodes up now
        return None


def _ray_totals() -> tuple[dict, dict | None]:
    """The resources of RAY_ADDRESS's (or a local) Ray, joined as `launch` does, and its autoscaler maximum."""
    import ray

    from rwkv5.train.launch import ensure_ray

    ensure_ray()
    return ray.cluster_resources(), _autoscaler_maximum()


def _most(total: dict, most: dict | None, key: str) -> float:
    """What the cluster has of `key`, or may grow to under its autoscaler."""
    return max(float(total.get(key, 0)), float((most or {}).get(key, 0)))


def cluster_resources(workers: int, gpus_per_worker: float, total: dict | None = None,
                      most: dict | None = None) -> Check:
    """GPUs >= workers x gpus_per_worker and a CPU per worker in the Ray cluster (joined as `launch` does).

    Args:
        total: the cluster's resources now. Default: `ray.cluster_resources()` of RAY_ADDRESS's (or a local) Ray.
        most: what its autoscaler may grow it to. Default: read from the cluster when `total` is not given.
    """
    if total is None:
        total, most = _ray_totals()
    return _timed("gpus", _cluster_resources, workers, gpus_per_worker, total, most)


def milestone_placement(needs: "RunNeeds", total: dict | None = None,
                        most: dict | None = None) -> tuple[Check, Placement]:
    """Where the run's milestone runs go (`rwkv5.train.milestone_settings.place_milestones`), as a check row
    that states the choice and the GPU numbers behind it; it fails for a `dedicated` that does not fit.

    Args:
        total, most: the cluster's resources and its autoscaler maximum. Default: read from Ray when the run
            or its fine-tunes use Ray workers.
    """
    start = time.perf_counter()
    uses_ray = needs.workers > 0 or needs.finetune_workers > 0
    if uses_ray and total is None:
        total, most = _ray_totals()
    gpus = _most(total, most, "GPU") if uses_ray else None
    cpus = _most(total, most, "CPU") if uses_ray else None
    placement = place_milestones(needs.milestone_mode, needs.workers, needs.gpus_per_worker, needs.finetune_workers,
                                 needs.finetune_gpus_per_worker, gpus, cpus)
    check = Check("milestones", "ok" if placement.ok else "failed", placement.detail, time.perf_counter() - start)
    return check, placement


def _batch_split(workers: int, micro_batch: int, global_batch: int) -> tuple[str, str]:
    shards = max(workers, 1)
    per_step = micro_batch * shards
    if global_batch % per_step:
        fits = [n for n in range(1, global_batch // micro_batch + 1) if (global_batch // micro_batch) % n == 0]
        return "failed", (f"{global_batch} sequences per step do not split into micro-batches of {micro_batch} over "
                          f"{shards} workers; worker counts that do: {', '.join(map(str, fits))}")
    return "ok", (f"{global_batch} sequences per step = micro-batch {micro_batch} x {global_batch // per_step} "
                  f"accumulations x {shards} workers")


def batch_split(workers: int, micro_batch: int, global_batch: int) -> Check:
    """The preset's global batch splits evenly over the workers (the sample order needs it): else one line that
    names the worker counts that do."""
    return _timed("batch", _batch_split, workers, micro_batch, global_batch)


def _write_probe(path: str, name: str, text: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{name}", "w") as f:
        f.write(text)


def _read_probe(path: str, name: str, remove: bool = False) -> str:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    target = f"{root.rstrip('/')}/{name}"
    with fs.open(target, "r") as f:
        text = f.read()
    if remove:
        fs.rm_file(target)
    return text


def _probe_on_node(paths: dict[str, str], name: str, token: str, node: str) -> list[str]:
    """On one node: read the driver's probe in each path, then write this node's own. Returns problems."""
    problems = []
    for label, path in paths.items():
        try:
            if _read_probe(path, name) != token:
                problems.append(f"{label} {path} on node {node}: holds another probe (not the same folder)")
                continue
            _write_probe(path, f"{name}-{node}", token)
        except Exception as exc:  # one line per folder: missing mount, permissions, credentials...
            problems.append(f"{label} {path} on node {node}: {type(exc).__name__}: {exc}")
    return problems


def _shared_paths(paths: dict[str, str], on_ray: bool, timeout: float) -> tuple[str, str]:
    name, token = f".preflight-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    problems: list[str] = []
    for label, path in paths.items():
        try:
            _write_probe(path, name, token)
        except Exception as exc:
            problems.append(f"{label} {path} not writable here: {type(exc).__name__}: {exc}")
    if problems:
        return "failed", "; ".join(problems)
    nodes = ["local"]
    if on_ray:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        probe = ray.remote(num_cpus=0)(_probe_on_node)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                .remote(paths, name, token, n[:8]) for n in nodes]
        try:
            problems = [p for found in ray.get(refs, timeout=timeout) for p in found]
        except Exception as exc:
            problems = [f"probe tasks did not finish in {timeout:.0f} s: {type(exc).__name__}"]
    else:
        problems = _probe_on_node(paths, name, token, "local")
    for label, path in paths.items():
        for node in nodes:
            try:
                _read_probe(path, f"{name}-{node[:8]}", remove=True)
            except Exception:
                pass  # already reported by the node's task
        try:
            _read_probe(path, name, remove=True)
        except Exception:
            pass
    if problems:
        return "failed", "; ".join(problems)
    return "ok", f"{', '.join(paths)} written and read back on {len(nodes)} node(s)"


def shared_paths(paths: dict[str, str], on_ray: bool, timeout: float = 60.0) -> Check:
    """Every node sees the same folders: this process writes a probe file into each path, a task on every
    alive Ray node (`on_ray`; else this process) reads it and writes its own, which is read back here.
    Probe files are removed afterwards.

    Args:
        paths: label -> local path or fsspec URL (created if missing, as the run would).
    """
    return _timed("shared paths", _shared_paths, paths, on_ray, timeout)


def _folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def estimate_bytes(source: str, splits: tuple[str, ...], fraction: float) -> tuple[float, float]:
    """(download bytes, shard bytes) of a source: the sample's bound, SlimPajama's split sizes for a Hub repo,
    the files' sizes for a folder."""
    if source == "sample":
        return _SAMPLE_BYTES / 2, _SAMPLE_BYTES / 2
    if "://" in source or Path(source).is_dir():
        import fsspec

        fs, root = fsspec.core.url_to_fs(source)
        raw = sum(fs.du(f"{root.rstrip('/')}/{s}") for s in splits if fs.isdir(f"{root.rstrip('/')}/{s}"))
        raw *= fraction
        return raw, raw * _TOKENS_PER_RAW_BYTE * 2
    sizes = [SLIMPAJAMA_SPLITS.get(s, (0.0, 0.0)) for s in splits]
    return sum(b for b, _ in sizes) * fraction, sum(t for _, t in sizes) * fraction * 2


def _disk_space(state_dir: str, source: str, splits: tuple[str, ...], fraction: float) -> tuple[str, str]:
    download, shards = estimate_bytes(source, splits, fraction)
    root = Path(state_dir)
    present = _folder_bytes(root / "data") if (root / "data").is_dir() else 0
    need = max(0.0, download + shards - present)
    where = root
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    detail = (f"needs ~{_gb(need)} (download ~{_gb(download)} + shards ~{_gb(shards)}, {_gb(present)} already "
              f"there); {_gb(free)} free at {where}")
    return ("ok" if need <= free else "failed"), detail


def disk_space(state_dir: str, source: str, splits: tuple[str, ...], fraction: float) -> Check:
    """Free space under `state_dir` for the download and the shards, minus what is already there."""
    return _timed("disk", _disk_space, state_dir, source, splits, fraction)


def _hub_access(repo_id: str, revision: str, timeout: float) -> tuple[str, str]:
    from data_prep.errors import DataPrepError
    from data_prep.source import HubSource

    from huggingface_hub import get_token

    hub = HubSource(repo_id, revision, timeout=timeout)
    token = "token sent" if get_token() else "no token"
    try:
        commit = hub.resolve()
    except DataPrepError as exc:
        return "failed", f"Hub not usable ({token}): {' '.join(str(exc).split())[:400]}"
    return "ok", f"{hub.endpoint} {repo_id}@{revision} = {commit[:12]} ({token})"


def hub_access(repo_id: str, revision: str, timeout: float = 10.0) -> Check:
    """The Hub answers (HF_ENDPOINT) and lets this token (HF_TOKEN) read `repo_id` at `revision`."""
    return _timed("hub", _hub_access, repo_id, revision, timeout)


def _build_kernel() -> str:
    from kernels.build import load_wkv5, source_hash

    load_wkv5()
    return source_hash()


def _kernel_build(gpus_per_worker: float, timeout: float) -> tuple[str, str]:
    import ray

    build = ray.remote(num_gpus=gpus_per_worker, num_cpus=0)(_build_kernel)
    try:
        return "ok", f"WKV5 CUDA extension {ray.get(build.remote(), timeout=timeout)} built/loaded on a GPU worker"
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return "failed", f"WKV5 CUDA extension did not build on a GPU worker: {lines[-1] if lines else exc}"


def kernel_build(gpus_per_worker: float, timeout: float = 900.0) -> Check:
    """The CUDA kernel builds (or loads from the kernel cache: seconds) in a Ray task holding a worker's GPUs."""
    return _timed("cuda kernel", _kernel_build, gpus_per_worker, timeout)


# Per service: the variable naming its URL, and a read-only request that only an open server answers.
_STACK_PROBES = {
    "Prefect API": ("PREFECT_API_URL", "/admin/version"),
    "MLflow": ("MLFLOW_TRACKING_URI", "/api/2.0/mlflow/experiments/search?max_results=1"),
    "Ray dashboard": ("RWKV5_RAY_DASHBOARD", "/api/jobs/"),
}


def _is_loopback(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _anonymous_status(url: str, timeout: float) -> int:
    """The HTTP status of a GET that carries no credentials (urllib adds none unless told to)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _stack_credentials(urls: dict[str, str], exempt_loopback: bool, timeout: float) -> tuple[str, str]:
    found, open_services = [], []
    for name, (_, path) in _STACK_PROBES.items():
        url = urls.get(name)
        parts = urllib.parse.urlsplit(url or "")
        if parts.scheme not in ("http", "https"):
            found.append(f"{name} not a server")
            continue
        if exempt_loopback and _is_loopback(parts.hostname or ""):
            found.append(f"{name} on loopback only")
            continue
        try:
            status = _anonymous_status(url.rstrip("/") + path, timeout)
        except OSError as exc:  # unreachable: the stage that needs it reports that; nothing is open here
            found.append(f"{name} {parts.netloc} not reachable ({type(exc).__name__})")
            continue
        if status in (401, 403):
            found.append(f"{name} {parts.netloc} refuses anonymous requests ({status})")
        else:
            open_services.append(f"{name} {parts.netloc} answers without credentials (HTTP {status})")
    if open_services:
        return "failed", "; ".join(open_services) + " (docs/scale-out.md, Credentials)"
    return "ok", "; ".join(found)


def stack_credentials(urls: dict[str, str] | None = None, exempt_loopback: bool = True,
                      timeout: float = 10.0) -> Check:
    """Fails when the Prefect API, MLflow or the Ray dashboard answers a request made without credentials.

    Anyone who can reach such a service can start flow runs, rewrite MLflow runs or run code on every GPU node
    through a Ray job. Services bound to a loopback address (the one-machine stack) are reachable from this
    machine only, and pass as they are.

    Args:
        urls: service name ("Prefect API", "MLflow", "Ray dashboard") -> base URL. Default: PREFECT_API_URL,
            MLFLOW_TRACKING_URI and RWKV5_RAY_DASHBOARD; a service without an http(s) URL is not checked.
        exempt_loopback: pass services whose host resolves to loopback addresses only, without a request.
            Default: True.
        timeout: seconds per request. Default: 10.
    """
    if urls is None:
        urls = {name: os.environ.get(var, "") for name, (var, _) in _STACK_PROBES.items()}
    return _timed("credentials", _stack_credentials, urls, exempt_loopback, timeout)


def _skip(name: str, why: str) -> Check:
    return Check(name, "skipped", why)


def run_preflight(needs: RunNeeds) -> Preflight:
    """The checks `needs` calls for, cheap ones first; the kernel build only where a GPU worker exists."""
    on_ray = needs.workers > 0
    gpu = on_ray and needs.gpus_per_worker > 0
    checks = [cluster_resources(needs.workers, needs.gpus_per_worker) if on_ray
              else _skip("gpus", "trains in this process, without Ray")]
    placement_check, placement = milestone_placement(needs)
    checks.append(placement_check)
    if needs.global_batch:
        checks.append(batch_split(needs.workers, needs.micro_batch, needs.global_batch))
    checks.append(shared_paths({"storage": needs.storage, "data": needs.data_dir}, on_ray))
    checks.append(disk_space(needs.state_dir, needs.source, tuple(needs.splits), needs.fraction))
    local = needs.source == "sample" or "://" in needs.source or Path(needs.source).is_dir()
    checks.append(_skip("hub", f"source {needs.source} is not on the Hub") if local
                  else hub_access(needs.source, needs.revision))
    if not gpu:
        checks.append(_skip("cuda kernel", "CPU run"))
    elif checks[0].failed:
        checks.append(_skip("cuda kernel", "not tried: the cluster lacks the GPUs"))
    else:
        checks.append(kernel_build(needs.gpus_per_worker))
    checks.append(stack_credentials())
    return Preflight(checks, placement if placement.ok else None)

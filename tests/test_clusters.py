"""clusters/: the cluster-launcher configs pass Ray's own validation offline, the KubeRay manifests their
CRD schemas, plus the checks neither makes; the resource check before training; shards and run folders
on a pyarrow filesystem URI (file://). Fast: no cluster is started here."""

from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from distseg.cluster import ResourceError, fit_training, plan_fits, training_resources
from distseg.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
CRDS = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
PINNED = {"torch", "torchvision", "ray", "mlflow"}  # exact pins in pyproject.toml


def pyproject_deps() -> dict[str, str]:
    """name (extras dropped) -> the full requirement string, from pyproject.toml."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0]: d for d in deps}


# --- cluster launcher ------------------------------------------------------------------------------------


def launcher_problems(config: dict) -> list[str]:
    """What Ray's schema does not check: a cluster name, GPU node types with integer GPU counts,
    min <= max workers per type, an autoscaling CPU pool from 0 on spot / preemptible machines, a GPU
    pool, idle timeout, distseg's pins in the setup commands."""
    problems = []
    if not config.get("cluster_name") or config["cluster_name"] == "default":
        problems.append("cluster_name is not set")
    if not config.get("idle_timeout_minutes"):
        problems.append("idle_timeout_minutes is not set")
    types = config.get("available_node_types", {})
    spot_cpu = gpu = False
    for name, node_type in types.items():
        resources = node_type.get("resources", {})
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if lo > hi:
            problems.append(f"{name}: min_workers {lo} > max_workers {hi}")
        if "GPU" in resources:
            if not isinstance(resources["GPU"], int) or resources["GPU"] < 1:
                problems.append(f"{name}: GPU resource {resources['GPU']!r} is not a positive integer")
            gpu = gpu or (name != config.get("head_node_type") and hi > 0)
        node_config = yaml.safe_dump(node_type.get("node_config", {}))
        if resources.get("CPU") and "GPU" not in resources and lo == 0 and hi > 0:
            spot_cpu = spot_cpu or "MarketType: spot" in node_config or "preemptible: true" in node_config
    if not spot_cpu:
        problems.append("no CPU node type scaling from 0 on spot / preemptible machines")
    if not gpu:
        problems.append("no GPU worker node type")
    setup = " ".join(config.get("setup_commands", []))
    deps = pyproject_deps()
    for name in PINNED:
        spec = deps[name].split("]", 1)[-1] if "[" in deps[name] else deps[name][len(name) :]
        if spec not in setup:
            problems.append(f"setup_commands do not install {name}{spec} (pyproject.toml's pin)")
    return problems


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_ray_validation_and_our_checks(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / name).read_text())
    config = prepare_config(raw)  # fills the provider's defaults, as `ray up` does; no cloud call
    validate_config(config)  # Ray's JSON schema (raises on an unknown key or a wrong type)
    assert launcher_problems(raw) == []
    assert config["cluster_name"] == "distseg"
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in starts


def test_launcher_checks_catch_bad_configs():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    raw["cluster_name"] = ""
    raw["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5
    raw["available_node_types"]["cpu_spot"]["min_workers"] = 9
    problems = launcher_problems(raw)
    assert "cluster_name is not set" in problems
    assert "gpu: GPU resource 0.5 is not a positive integer" in problems
    assert "cpu_spot: min_workers 9 > max_workers 8" in problems
    raw = yaml.safe_load((CLUSTERS / "gcp.yaml").read_text())
    raw["setup_commands"] = ["pip install torch"]
    assert any("torch==2.14.1" in p for p in launcher_problems(raw))
    raw = yaml.safe_load((CLUSTERS / "gcp.yaml").read_text())
    raw["available_node_types"]["gpu"]["max_wrokers"] = 2  # Ray's schema rejects an unknown key
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(raw))


SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",  # an AWS access key id
    r"(?i)aws_secret_access_key",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)\"private_key\"",
    r"(?i)(password|secret|auth_token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{12,}",
]


def test_no_secrets_in_cluster_files():
    files = sorted(p for p in CLUSTERS.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob.yaml", "README.md"}
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, text), f"{path.relative_to(REPO)} matches {pattern}"
    assert re.search(SECRET_PATTERNS[-1], "auth_token: 0123456789abcdef0123")  # the last pattern can match


# --- KubeRay ---------------------------------------------------------------------------------------------


def crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not available: {CRDS} is absent (../shared/schemas)")
    return _crd_schema(kind)


@functools.cache
def _crd_schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB of YAML
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def unknown_keys(value, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not define, wherever it lists properties and keeps no unknown fields (the CRD
    itself lets them through: Kubernetes prunes them silently, so a typo would just vanish)."""
    found = []
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            found += [f"{path}.{k}" for k in value if k not in props and not schema.get("additionalProperties")]
        for key, item in value.items():
            sub = (props or {}).get(key) or (
                schema["additionalProperties"] if isinstance(schema.get("additionalProperties"), dict) else None
            )
            if sub:
                found += unknown_keys(item, sub, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_keys(item, schema["items"], f"{path}[{i}]")
    return found


def cluster_specs(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def kuberay_problems(manifest: dict) -> list[str]:
    """The checks the CRD does not make: unknown keys, submissionMode, rayStartParams values as strings,
    min <= max replicas, GPU groups asking for whole GPUs, in-tree autoscaling, token auth."""
    schema = crd_schema(manifest["kind"])
    problems = [f"schema: {e.message} at {'/'.join(map(str, e.absolute_path))}" for e in _errors(manifest, schema)]
    problems += [f"unknown key {k}" for k in unknown_keys(manifest, schema)]
    spec = manifest["spec"]
    if manifest["kind"] == "RayJob":
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            problems.append(f"submissionMode {spec['submissionMode']!r} not in {sorted(SUBMISSION_MODES)}")
        if not str(spec.get("entrypoint", "")).startswith("python jobs/pretrain.py"):
            problems.append("entrypoint does not run python jobs/pretrain.py")
        if not spec.get("shutdownAfterJobFinishes"):
            problems.append("shutdownAfterJobFinishes is not set")
    cluster = cluster_specs(manifest)
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append("enableInTreeAutoscaling is not true")
    if cluster.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode is not token")
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for name, group in groups:
        for key, value in group.get("rayStartParams", {}).items():
            if not isinstance(value, str):
                problems.append(f"{name}: rayStartParams.{key} is {type(value).__name__}, not a string")
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if name != "head" and isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(f"{name}: minReplicas {group['minReplicas']} > maxReplicas {group['maxReplicas']}")
        gpus = group.get("rayStartParams", {}).get("num-gpus")
        limits = [c.get("resources", {}).get("limits", {}) for c in group["template"]["spec"]["containers"]]
        pod_gpus = sum(int(lim.get("nvidia.com/gpu", 0)) for lim in limits)
        if gpus is not None and (not str(gpus).isdigit() or int(gpus) != pod_gpus):
            problems.append(f"{name}: num-gpus {gpus!r} is not the pod's whole nvidia.com/gpu limit {pod_gpus}")
    return problems


def _errors(manifest: dict, schema: dict):
    import jsonschema

    return sorted(
        jsonschema.Draft7Validator(schema).iter_errors(manifest), key=lambda e: [str(k) for k in e.absolute_path]
    )


def load_manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / "kuberay" / name).read_text())


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest_validates(name):
    manifest = load_manifest(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert kuberay_problems(manifest) == []
    groups = {g["groupName"]: g for g in cluster_specs(manifest)["workerGroupSpecs"]}
    assert groups["cpu-spot"]["minReplicas"] == 0 and groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    ray_pin = pyproject_deps()["ray"].split("==")[1]
    images = [c["image"] for _, g in [("h", cluster_specs(manifest)["headGroupSpec"]), *groups.items()]
              for c in g["template"]["spec"]["containers"]]  # fmt: skip
    assert all(img.startswith(f"rayproject/ray:{ray_pin}-py311") for img in images), images


def test_kuberay_checks_catch_bad_manifests():
    job = load_manifest("rayjob.yaml")
    job["spec"]["submissionMode"] = "BatchMode"
    job["spec"]["shutdownAfterJobFinsihes"] = True  # a typo Kubernetes would prune silently
    cluster = job["spec"]["rayClusterSpec"]
    cluster["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = 1
    cluster["workerGroupSpecs"][0]["minReplicas"] = 10
    problems = kuberay_problems(job)
    assert any("submissionMode 'BatchMode'" in p for p in problems)
    assert "unknown key .spec.shutdownAfterJobFinsihes" in problems
    assert "gpu: rayStartParams.num-gpus is int, not a string" in problems
    assert "cpu-spot: minReplicas 10 > maxReplicas 8" in problems
    schema = [p for p in problems if p.startswith("schema:")]  # the CRD types rayStartParams; the rest it lets by
    assert schema == [
        "schema: 1 is not of type 'string' at spec/rayClusterSpec/workerGroupSpecs/1/rayStartParams/num-gpus"
    ]
    cluster = load_manifest("raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert any(p.startswith("schema:") and "maxReplicas" in p for p in kuberay_problems(cluster))


def test_rayjob_runs_the_raycluster_with_pyproject_pins():
    job, cluster = load_manifest("rayjob.yaml"), load_manifest("raycluster.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shared = yaml.safe_load((CLUSTERS / "kuberay" / "runtime-env.yaml").read_text())
    assert {k: v for k, v in env.items() if k != "working_dir"} == shared
    assert env["working_dir"].endswith(".zip")
    wanted = {spec for name, spec in pyproject_deps().items() if name != "ray"}  # Ray is in the image
    assert set(shared["pip"]["packages"]) == wanted


# --- the resource check before training ----------------------------------------------------------------


def demo(*overrides: str):
    return load_config("demo", list(overrides))


def test_training_resources_is_the_formula_tune_plans_with():
    from distseg.tune.sweep import TRIAL_CPU, trial_resources

    cfg = demo("pretrain.num_workers=2", "pretrain.cpus_per_worker=3", "pretrain.use_gpu=true")
    assert training_resources(cfg.pretrain) == {"CPU": 7, "GPU": 2}
    assert trial_resources(cfg) == {"CPU": 7 + TRIAL_CPU, "GPU": 2}


def test_plan_fits_places_each_worker_on_one_node():
    two_small = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert plan_fits(two_small, 1, {"CPU": 2}, 1)  # worker on one node, ingest on the other
    assert not plan_fits(two_small, 1, {"CPU": 3}, 1)  # 4 CPUs in all, but no node has 3
    assert not plan_fits(two_small, 2, {"CPU": 2}, 1)  # nothing left for the ingest
    gpus = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 16.0}]
    assert plan_fits(gpus, 2, {"CPU": 6, "GPU": 1}, 1)
    assert not plan_fits(gpus, 3, {"CPU": 6, "GPU": 1}, 1)


def test_fit_training_lowers_cpus_per_worker_to_leave_the_ingest_a_cpu(capsys):
    cfg = demo()  # 1 worker x cpus_per_worker 2: on a 2-CPU head the ingest would wait forever
    assert cfg.pretrain.cpus_per_worker == 2
    fitted = fit_training(cfg, [{"CPU": 2.0}], "1 alive node(s)")
    assert fitted.pretrain.cpus_per_worker == 1 and cfg.pretrain.cpus_per_worker == 2
    assert "running with pretrain.cpus_per_worker=1" in capsys.readouterr().out
    assert fit_training(cfg, [{"CPU": 3.0}], "x") is cfg  # fits: unchanged


def test_fit_training_stops_naming_the_settings():
    with pytest.raises(ResourceError) as err:
        fit_training(demo("pretrain.fit_cluster=false"), [{"CPU": 2.0}], "1 alive node(s)")
    text = str(err.value)
    assert "needs 3 CPU (pretrain.num_workers=1 x cpus_per_worker=2 + 1 for the ingest)" in text
    assert (
        "can give CPU 2, GPU 0 in all" in text and "pretrain.cpus_per_worker" in text and "ray start --num-cpus" in text
    )
    with pytest.raises(ResourceError, match=r"needs 3 CPU .*, 1 GPU .*set pretrain.use_gpu=false"):
        fit_training(demo("pretrain.use_gpu=true"), [{"CPU": 64.0}], "1 alive node(s)")
    with pytest.raises(ResourceError, match="needs 5 CPU"):  # 2 workers x 1 CPU + ingest cannot fit 2 CPUs
        fit_training(demo("pretrain.num_workers=2"), [{"CPU": 2.0}], "1 alive node(s)")


# --- shards and run folders on a pyarrow filesystem URI --------------------------------------------------


def test_shards_and_run_files_through_a_file_uri(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distseg import storage
    from distseg.train.ingest import IngestError, count_rows, shard_files

    (tmp_path / "mined" / "shards").mkdir(parents=True)
    for i, n in enumerate([3, 4]):
        pq.write_table(pa.table({"image_id": [f"{i}_{j}" for j in range(n)]}), tmp_path / f"mined/shards/{i}.parquet")
    uri = (tmp_path / "mined").as_uri()  # file:///...
    files = shard_files(uri)
    assert files == [f"{uri}/shards/0.parquet", f"{uri}/shards/1.parquet"]
    assert count_rows(uri) == 7
    with pytest.raises(IngestError, match="no Parquet shards"):
        shard_files((tmp_path / "empty").as_uri())
    run = storage.join((tmp_path / "runs").as_uri(), "demo", "mlflow_run_id")
    assert storage.read_text(run) is None
    storage.write_text(run, "abc123")
    assert (tmp_path / "runs" / "demo" / "mlflow_run_id").read_text() == "abc123"
    assert storage.read_text(run) == "abc123"
    assert storage.list_dirs((tmp_path / "runs").as_uri()) == [f"{(tmp_path / 'runs').as_uri()}/demo"]
    assert storage.absolute("s3://b/x") == "s3://b/x" and storage.absolute("rel") == str(Path("rel").resolve())

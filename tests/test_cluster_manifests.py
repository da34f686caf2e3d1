"""Cluster configs checked without a cluster: KubeRay manifests strictly against the real CRDs,
the RayService's Serve config against Ray Serve's schema, the `ray up` config against Ray's
autoscaler schema, and every reference (image, Ray version, command, job file) against the repo.

The CRDs do not forbid unknown fields (nor do Ray Serve's pydantic models), so a misspelt key
would pass a plain check: here every object that names its properties refuses the others.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import gzip
import json
import re
import shlex
import typing
from pathlib import Path

import jsonschema
import pytest
import ray
import typer.main
import yaml
from pydantic import BaseModel

from noiseclr.cli import app
from noiseclr.discovery.config import DiscoveryConfig
from noiseclr.serving.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
# The v1 schemas of the KubeRay CRDs, vendored (cluster/kuberay/crds/README.md); the published
# CRDs themselves, where a checkout has them beside it, to check the copy against.
CRDS = CLUSTER / "kuberay" / "crds"
PUBLISHED = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RAY_UP = sorted((CLUSTER / "ray-up").glob("*.yaml"))
DOCKERFILE = CLUSTER / "image" / "Dockerfile"
IMAGE = (CLUSTER / "image" / "IMAGE").read_text().strip()
RAYJOBS = [p for p in MANIFESTS if yaml.safe_load(p.read_text())["kind"] == "RayJob"]
SD15_JOBS = sorted((ROOT / "jobs").glob("sd15-*.yaml"))
SDXL_JOBS = sorted((ROOT / "jobs").glob("sdxl-*.yaml"))
# Ray Serve's pydantic models warn on import (Ray's code, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")
MAPS = ("properties", "patternProperties", "definitions", "$defs")

# metadata is `type: object` in the CRDs; the API server checks it. These are its usual keys.
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"},  # DNS-1035 label
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict_schema(schema: object) -> object:
    """A copy of an OpenAPI / JSON schema in which every object that names its properties refuses
    other keys (unless it says additionalProperties or x-kubernetes-preserve-unknown-fields), an
    int-or-string takes both, and `nullable` allows null."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: ({n: strict_schema(s) for n, s in v.items()} if k in MAPS else strict_schema(v))
        for k, v in schema.items()
    }
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    return out


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def crd_validator(api_version: str, kind: str, strict: bool = True) -> jsonschema.Draft7Validator:
    """The openAPIV3Schema of `kind` at the served version named by `api_version`; strict, or as
    the CRD publishes it."""
    group, _, version = api_version.partition("/")
    for path in CRDS.glob("*.json.gz"):
        crd = json.loads(gzip.decompress(path.read_bytes()))
        if (crd["group"], crd["kind"], crd["version"]) == (group, kind, version):
            schema = crd["openAPIV3Schema"]
            if strict:
                schema = strict_schema(schema)
                schema["properties"]["metadata"] = METADATA
            return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"no CRD schema for {kind} {api_version} in {CRDS}")


@pytest.mark.skipif(not PUBLISHED.is_dir(), reason=f"no published KubeRay CRDs at {PUBLISHED}")
@pytest.mark.parametrize("plural", ["rayclusters", "rayjobs", "rayservices"])
def test_the_vendored_crd_schemas_are_the_published_ones(plural: str) -> None:
    crd = load(PUBLISHED / f"ray.io_{plural}.yaml")
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    vendored = json.loads(gzip.decompress((CRDS / f"{plural}.v1.json.gz").read_bytes()))
    assert vendored["kind"] == crd["spec"]["names"]["kind"]
    assert vendored["openAPIV3Schema"] == v1["schema"]["openAPIV3Schema"]


def check_manifest(doc: dict) -> None:
    """Raise jsonschema.ValidationError unless `doc` fits its kind's CRD strictly."""
    crd_validator(doc["apiVersion"], doc["kind"]).validate(doc)


def ray_up_schema() -> dict:
    return strict_schema(
        json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    )


def serve_config_v2(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def ray_cluster(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster, RayJob or RayService."""
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def groups(doc: dict) -> list[dict]:
    """The head group, then the worker groups."""
    cluster = ray_cluster(doc)
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def pods(doc: dict) -> list[dict]:
    """Every pod template, the head's first."""
    return [group["template"] for group in groups(doc)]


def model_types(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models inside a type annotation (Optional[...], list[...], Union[...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in model_types(arg)]


def unknown_keys(model: type[BaseModel], data: object, where: str = "") -> list[str]:
    """Keys in `data` that `model` (and the models nested in its fields) does not name: Ray
    Serve's schemas ignore unknown keys, which would hide a misspelt one."""
    if not isinstance(data, dict):
        return []
    fields = {alias: f for name, f in model.model_fields.items() for alias in (name, f.alias) if alias}
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(where + key)
            continue
        nested = model_types(fields[key].annotation)
        if len(nested) == 1:
            for item in value if isinstance(value, list) else [value]:
                found += unknown_keys(nested[0], item, f"{where}{key}.")
    return found


def check_serve_config(config: dict) -> None:
    """Validate with Ray Serve's own schema; raise ValueError naming any key it does not know."""
    from ray.serve.schema import ServeDeploySchema

    unknown = unknown_keys(ServeDeploySchema, config)
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(unknown)}")
    ServeDeploySchema.model_validate(config)


def cli_commands() -> dict:
    return typer.main.get_command(app).commands


def config_class(command: str) -> type:
    from noiseclr.workflows.sweep import SweepConfig

    return {"discover": DiscoveryConfig, "serve": ServeConfig, "sweep": SweepConfig}[command]


def dockerfile_args() -> dict[str, str]:
    text = DOCKERFILE.read_text()
    return dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]+)\"?$", text, re.M))


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` leave `path` out of the build context (last match wins)."""
    out = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        if fnmatch.fnmatch(path.rstrip("/"), pattern.lstrip("!").rstrip("/")):
            out = not keep
    return out


def misspelt(doc: dict, path: tuple, wrong: str) -> dict:
    """A copy of `doc` whose key at `path` (keys and list indexes) is renamed to `wrong`."""
    doc = copy.deepcopy(doc)
    *parents, key = path
    node = doc
    for p in parents:
        node = node[p]
    node[wrong] = node.pop(key)
    return doc


# ----------------------------------------------------------------------------------- KubeRay


def test_manifests_are_found() -> None:
    assert {load(p)["kind"] for p in MANIFESTS} == {"RayCluster", "RayJob", "RayService"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_fits_its_crd_strictly(path: Path) -> None:
    check_manifest(load(path))


@pytest.mark.parametrize(
    ("manifest", "path", "wrong"),
    [
        ("raycluster.yaml", ("spec", "workerGroupSpecs", 0, "replicas"), "replica"),
        ("raycluster.yaml", ("spec", "rayVersion"), "rayVersio"),
        (
            "raycluster.yaml",
            ("spec", "headGroupSpec", "template", "spec", "containers", 0, "image"),
            "imagePullPolice",
        ),
        ("rayjob-discovery.yaml", ("spec", "entrypointNumGpus"), "entrypointNumGPUs"),
        ("rayjob-discovery.yaml", ("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobFinished"),
        (
            "rayservice-edit.yaml",
            ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "tolerations"),
            "toleration",
        ),
        ("rayservice-edit.yaml", ("metadata", "namespace"), "namespac"),
    ],
)
def test_misspelt_key_is_refused(manifest: str, path: tuple, wrong: str) -> None:
    """The CRD as published takes the misspelling; the strict check refuses it, naming it."""
    doc = misspelt(load(CLUSTER / "kuberay" / manifest), path, wrong)
    crd_validator(doc["apiVersion"], doc["kind"], strict=False).validate(doc)
    with pytest.raises(jsonschema.ValidationError, match=rf"'{wrong}' was unexpected"):
        check_manifest(doc)


def test_wrong_type_is_refused() -> None:
    doc = load(CLUSTER / "kuberay" / "raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="two"):
        check_manifest(doc)


def test_int_or_string_takes_both_and_nothing_else() -> None:
    doc = load(CLUSTER / "kuberay" / "raycluster.yaml")
    limits = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert isinstance(limits["nvidia.com/gpu"], int) and isinstance(limits["cpu"], str)
    limits["memory"] = 30.5  # a float is neither
    with pytest.raises(jsonschema.ValidationError):
        check_manifest(doc)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_uses_the_image_and_ray_version(path: Path) -> None:
    doc = load(path)
    images = [c["image"] for pod in pods(doc) for c in pod["spec"]["containers"]]
    assert images and set(images) == {IMAGE}
    assert ray_cluster(doc)["rayVersion"] == ray.__version__


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_gpu_workers_ask_for_gpus(path: Path) -> None:
    doc = load(path)
    head, *workers = pods(doc)
    assert "nvidia.com/gpu" not in head["spec"]["containers"][0]["resources"]["limits"]
    for pod in workers:
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_ray_pod_names_its_metrics_port(path: Path) -> None:
    """dashboards/podmonitor.yaml scrapes the container port it names on every Ray pod (KubeRay
    labels the pods ray.io/is-ray-node=yes, which it selects)."""
    monitor = load(ROOT / "dashboards" / "podmonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for group in groups(load(path)):
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"])


# ----------------------------------------------------------------------------------- RayJob


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_runs_a_cli_command_on_a_valid_job(path: Path) -> None:
    doc = load(path)
    program, command, *args = shlex.split(doc["spec"]["entrypoint"])
    assert program == "noiseclr"
    assert command in cli_commands(), f"`noiseclr {command}` is not a command"
    options = {opt for p in cli_commands()[command].params for opt in p.opts}
    given = {a for a in args if a.startswith("--")}
    assert given <= options, f"unknown options {given - options}"
    job = config_class(command).from_yaml(ROOT / args[args.index("--config") + 1])
    if command == "discover":
        # GPUs for the Train workers, the driver (it resolves `device`) and Ray Data's VAE encoder
        workers = ray_cluster(doc)["workerGroupSpecs"][0]["replicas"]
        assert doc["spec"]["entrypointNumGpus"] == 1
        assert workers >= job.distributed.workers + 2


# ----------------------------------------------------------------------------------- RayService


def rayservice() -> dict:
    return next(d for d in map(load, MANIFESTS) if d["kind"] == "RayService")


def test_serve_config_v2_fits_ray_serve_strictly() -> None:
    check_serve_config(serve_config_v2(rayservice()))


@pytest.mark.parametrize(
    ("path", "wrong"),
    [
        (("applications", 0, "route_prefix"), "route_prefx"),
        (("http_options", "host"), "hostname"),
        (("proxy_location",), "proxy_locaton"),
    ],
)
def test_misspelt_serve_key_is_refused(path: tuple, wrong: str) -> None:
    """Ray Serve's schema ignores the misspelling; the strict check refuses it, naming it."""
    from ray.serve.schema import ServeDeploySchema

    config = misspelt(serve_config_v2(rayservice()), path, wrong)
    ServeDeploySchema.model_validate(config)
    with pytest.raises(ValueError, match=wrong):
        check_serve_config(config)


def test_misspelt_key_in_a_nested_serve_model_is_refused() -> None:
    config = serve_config_v2(rayservice())
    config["applications"][0]["deployments"] = [
        {"name": "EditServer", "autoscaling_config": {"max_replica": 4}}
    ]
    with pytest.raises(ValueError, match=r"applications\.deployments\.autoscaling_config\.max_replica"):
        check_serve_config(config)


def test_serve_applications_build_from_their_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """import_path imports and is callable; args.config (relative to the image's working dir
    /app, the repo root here) is a valid ServeConfig; the builder binds the app (no server)."""
    import importlib

    monkeypatch.chdir(ROOT)
    # The pods get the keys from the Secret noiseclr-secrets; a 0.0.0.0 app without them is refused.
    monkeypatch.setenv("NOISECLR_API_KEYS", "a-key-from-the-secret")
    for application in serve_config_v2(rayservice())["applications"]:
        module, _, name = application["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), name)
        assert callable(builder)
        cfg = ServeConfig.from_yaml(ROOT / application["args"]["config"])
        assert builder(application["args"]) is not None
        assert cfg.device == "cuda" and cfg.replicas.num_gpus == 1


def test_rayservice_gpu_workers_hold_the_most_serve_replicas() -> None:
    doc = rayservice()
    cfg = ServeConfig.from_yaml(ROOT / serve_config_v2(doc)["applications"][0]["args"]["config"])
    group = ray_cluster(doc)["workerGroupSpecs"][0]
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cfg.replicas.num_replicas == "auto" and cfg.replicas.max_replicas > cfg.replicas.min_replicas
    assert group["maxReplicas"] * gpus >= cfg.replicas.max_replicas * cfg.replicas.num_gpus
    assert ray_cluster(doc)["enableInTreeAutoscaling"] is True


# ----------------------------------------------------------------------------------- image


def test_dockerfile_builds_the_installed_ray_and_copies_what_exists() -> None:
    text = DOCKERFILE.read_text()
    assert dockerfile_args()["RAY_VERSION"] == ray.__version__
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu$", text, re.M)
    patterns = [
        line.strip()
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = re.findall(r"^COPY (.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _ = [a for a in line.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not ignored(source, patterns), f"{source} is left out by the .dockerignore"


def test_image_tag_is_the_package_version() -> None:
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version and f"ghcr.io/noiseclr/noiseclr:{version[1]}" == IMAGE


# ----------------------------------------------------------------------------------- ray up


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_config_fits_rays_schema_strictly(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(path)
    jsonschema.validate(config, ray_up_schema())
    validate_config(prepare_config(config))  # Ray's own check after its defaults (no cloud SDK)
    assert config["docker"]["image"] == IMAGE


@pytest.mark.parametrize(
    ("path", "wrong"),
    [
        (("idle_timeout_minutes",), "idle_timeout_minute"),
        (("docker", "image"), "images"),
        (("available_node_types", "gpu", "min_workers"), "min_worker"),
    ],
)
def test_misspelt_ray_up_key_is_refused(path: tuple, wrong: str) -> None:
    config = misspelt(load(RAY_UP[0]), path, wrong)
    with pytest.raises(jsonschema.ValidationError, match=wrong):
        jsonschema.validate(config, ray_up_schema())


# ----------------------------------------------------------------------------------- jobs


@pytest.mark.parametrize("path", SD15_JOBS, ids=lambda p: p.name)
def test_sd15_job_has_the_papers_values(path: Path) -> None:
    cfg = DiscoveryConfig.from_yaml(path)
    paper = {"n_images": 100, "k": 100, "negatives": 20, "tau": 0.5, "lr": 1e-3, "batch": 6}
    assert {key: cfg.record()[key] for key in paper} == paper
    assert cfg.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.evaluation.enabled  # oracle-free there
    assert cfg.gallery.prompt and cfg.evaluation.images == 4
    assert cfg.tracking.registered_model == f"noiseclr-{cfg.name}" and cfg.tracking.alias == "champion"
    assert cfg.distributed.workers == (6 if path.stem.endswith("-6gpu") else 0)


def test_sd15_jobs_cover_the_four_domains_and_the_served_banks() -> None:
    names = {DiscoveryConfig.from_yaml(p).name for p in SD15_JOBS}
    assert names == {"faces", "cats", "cars", "paintings"}
    banks = ServeConfig.from_yaml(ROOT / "jobs" / "serve-sd15.yaml").banks
    assert banks == {name: f"models:/noiseclr-{name}@champion" for name in names}


@pytest.mark.parametrize("path", SDXL_JOBS, ids=lambda p: p.name)
def test_sdxl_job_has_the_papers_objective_on_six_gpus_at_1024(path: Path) -> None:
    """The paper's objective; one image of each batch per worker at SDXL's own 1024 px (the
    model's side), gradient checkpointing on, bf16; registered where serve-sdxl.yaml reads it."""
    cfg = DiscoveryConfig.from_yaml(path)
    paper = {"n_images": 100, "k": 100, "negatives": 20, "tau": 0.5, "lr": 1e-3, "batch": 6}
    assert {key: cfg.record()[key] for key in paper} == paper
    assert cfg.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.distributed.workers == 6 and cfg.method.batch % cfg.distributed.workers == 0
    assert cfg.run.gradient_checkpointing is True and cfg.optim.precision == "bf16"
    assert cfg.evaluation.enabled and cfg.gallery.prompt
    assert cfg.tracking.registered_model == f"noiseclr-sdxl-{cfg.name}" and cfg.tracking.alias == "champion"
    assert cfg.storage.path == f"s3://noiseclr-runs/sdxl-{cfg.name}"


def test_sdxl_jobs_cover_the_four_domains_and_the_served_banks() -> None:
    names = {DiscoveryConfig.from_yaml(p).name for p in SDXL_JOBS}
    assert names == {"faces", "cats", "cars", "paintings"}
    serve = ServeConfig.from_yaml(ROOT / "jobs" / "serve-sdxl.yaml")
    assert serve.banks == {name: f"models:/noiseclr-sdxl-{name}@champion" for name in names}
    assert serve.model == "stabilityai/stable-diffusion-xl-base-1.0" and serve.precision == "bf16"

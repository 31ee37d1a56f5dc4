"""deploy/k8s/ without a cluster: every Kubernetes object validated against the API schemas of
Kubernetes releases (kubernetes-validate), the KServe objects checked field by field against
KServe's API, and the cross-references between the manifests, the server, the Dockerfile and
docs/kubernetes.md."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mmoe.service.app import GRACEFUL_SHUTDOWN_S
from mmoe.service.grpc_v2 import STOP_GRACE_S
from mmoe.service.repository import MODEL_FILE, ROUTING_FILE, scan
from mmoe.service.routes import health
from mmoe.service.routing import parse_routing
from mmoe.service.settings import Settings
from tests.docs import bash_commands
from tests.e2e.test_deploy import STAGES, run_model_job

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCS = ROOT / "docs" / "kubernetes.md"
# The oldest release the manifests need (the pre-stop `sleep` action is on by default from
# 1.30) and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
KSERVE_KINDS = {"InferenceService", "ServingRuntime"}


def _images(kustomization: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """kustomize's `images:` transformer, for the fields these manifests use."""
    for rule in kustomization.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name, _, tag = container["image"].partition(":")
                if name == rule["name"]:
                    new_tag = rule.get("newTag", tag)
                    container["image"] = rule.get("newName", name) + (
                        f":{new_tag}" if new_tag else ""
                    )


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k directory` would apply (resources, recursively, and
    images; kustomize_cli_matches checks this against kubectl itself where it is installed)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "images"}, (
        f"{directory}: a kustomize feature this test does not apply"
    )
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        if path.is_dir():
            docs += kustomize(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    _images(kustomization, docs)
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec)
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


PLAIN = kustomize(K8S)
KSERVE = kustomize(K8S / "kserve")


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


DEPLOYMENT = one(PLAIN, "Deployment")
POD = DEPLOYMENT["spec"]["template"]["spec"]
(SERVER,) = POD["containers"]
RUNTIME = one(KSERVE, "ServingRuntime")
(KSERVE_SERVER,) = RUNTIME["spec"]["containers"]
ISVC = one(KSERVE, "InferenceService")
PVC = one(PLAIN, "PersistentVolumeClaim")
JOB = one(PLAIN, "Job")
(JOB_CONTAINER,) = JOB["spec"]["template"]["spec"]["containers"]
# The model repository the servers serve, and where the volume is mounted in them.
REPOSITORY = PurePosixPath(env(SERVER)["MMOE_MODEL_REPOSITORY"])
(SERVER_MOUNT,) = [m for m in SERVER["volumeMounts"] if m["name"] == "models"]


def _server_port(container: dict[str, Any]) -> int:
    """The HTTP port the server listens on in this container: MMOE_PORT, or the image's."""
    image_env = STAGES["runtime"].env()
    return int(env(container).get("MMOE_PORT", image_env["MMOE_PORT"]))


# ------------------------------------------------------------------------ the files themselves


def test_every_manifest_is_applied_by_a_kustomization() -> None:
    listed = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            path = (kustomization.parent / resource).resolve()
            assert path.exists(), f"{kustomization}: no {resource}"
            if path.is_dir():
                assert (path / "kustomization.yaml").is_file(), path
            listed.add(path)
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests <= listed, f"not applied by any kustomization: {manifests - listed}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", [K8S, K8S / "kserve"], ids=["plain", "kserve"])
def test_kustomize_cli_matches(directory: Path) -> None:
    """kubectl's own kustomize renders the objects this test reads."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out), key=key) == sorted(kustomize(directory), key=key)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_validate(version: str) -> None:
    objects = {(d["kind"], d["metadata"]["name"]): d for d in PLAIN + KSERVE}
    core = [d for d in objects.values() if d["kind"] not in KSERVE_KINDS]
    assert {d["kind"] for d in core} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "Job",
    }
    for doc in core:
        # strict: a misspelt or unknown field is an error, not silently dropped
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_catches_a_wrong_field() -> None:
    """The validator is not a rubber stamp: a misspelt probe field fails."""
    broken = json.loads(json.dumps(DEPLOYMENT))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# KServe's CRDs are not in kubernetes-validate, nor is their schema in a PyPI package (the kserve
# SDK ships generated classes, not the CRD): the fields below are those of KServe's API
# (serving.kserve.io v1beta1 InferenceService, v1alpha1 ServingRuntime, as in KServe 0.21),
# and the containers are validated as Kubernetes containers.
ISVC_FIELDS = {"apiVersion", "kind", "metadata", "spec"}
ISVC_SPEC_FIELDS = {"predictor", "transformer", "explainer", "canary", "tracing"}
PREDICTOR_FIELDS = {
    "model", "minReplicas", "maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "serviceAccountName",
    "annotations", "labels", "nodeSelector", "tolerations", "affinity", "resources",
    "volumes", "securityContext", "deploymentStrategy", "autoScaling", "logger", "batcher",
}  # fmt: skip
MODEL_FIELDS = {
    "modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri", "storage",
    "env", "args", "command", "image", "resources", "ports", "readinessProbe", "livenessProbe",
    "securityContext", "volumeMounts",
}  # fmt: skip
RUNTIME_SPEC_FIELDS = {
    "supportedModelFormats", "protocolVersions", "containers", "multiModel", "disabled",
    "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint", "volumes", "nodeSelector",
    "tolerations", "affinity", "annotations", "labels", "imagePullSecrets", "replicas",
}  # fmt: skip
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


def test_kserve_objects_have_kserve_fields() -> None:
    assert ISVC["apiVersion"] == "serving.kserve.io/v1beta1"
    assert set(ISVC) <= ISVC_FIELDS and set(ISVC["spec"]) <= ISVC_SPEC_FIELDS
    predictor = ISVC["spec"]["predictor"]
    assert set(predictor) <= PREDICTOR_FIELDS, set(predictor) - PREDICTOR_FIELDS
    assert "containers" not in predictor, "a custom predictor has no protocolVersion"
    model = predictor["model"]
    assert set(model) <= MODEL_FIELDS, set(model) - MODEL_FIELDS
    assert set(model["modelFormat"]) <= {"name", "version"}
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]

    assert RUNTIME["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert set(RUNTIME) <= ISVC_FIELDS and set(RUNTIME["spec"]) <= RUNTIME_SPEC_FIELDS
    for fmt in RUNTIME["spec"]["supportedModelFormats"]:
        assert set(fmt) <= {"name", "version", "autoSelect", "priority"}
    assert set(RUNTIME["spec"]["protocolVersions"]) <= PROTOCOLS


def test_the_inference_service_runs_on_the_runtime_with_v2() -> None:
    model = ISVC["spec"]["predictor"]["model"]
    spec = RUNTIME["spec"]
    assert model["runtime"] == RUNTIME["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] == "v2" and "v2" in spec["protocolVersions"]
    # KServe mounts the storageUri at /mnt/models: the server reads the file there.
    m = re.fullmatch(r"pvc://([^/]+)/(.+)", model["storageUri"])
    assert m, model["storageUri"]
    assert m.group(1) == PVC["metadata"]["name"]
    assert env(KSERVE_SERVER)["MMOE_MODEL_PATH"] == f"/mnt/models/{m.group(2)}"
    assert f"/models/{m.group(2)}" in " ".join(JOB_CONTAINER["command"])
    # Knative serves one port per revision, named for its protocol; the server listens on it.
    (port,) = KSERVE_SERVER["ports"]
    assert port["name"] == "http1" and port["containerPort"] == _server_port(KSERVE_SERVER)
    assert "MMOE_GRPC_PORT" not in env(KSERVE_SERVER), "a second port Knative would not route"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_kserve_container_is_a_valid_kubernetes_container(version: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kserve-runtime"},
        "spec": {"containers": [KSERVE_SERVER]},
    }
    kubernetes_validate.validate(pod, version, strict=True)


# ----------------------------------------------------------------------- cross-references


def test_the_service_budget_and_autoscaler_select_the_deployments_pods() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    selector = DEPLOYMENT["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = one(PLAIN, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["selector"] == selector  # no other pods answer for it
    assert one(PLAIN, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    target = one(PLAIN, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])
    spread = POD["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
    assert spread == selector


def test_ports_are_the_servers() -> None:
    ports = {p["name"]: p["containerPort"] for p in SERVER["ports"]}
    assert ports["http"] == _server_port(SERVER)
    assert ports["grpc"] == int(env(SERVER)["MMOE_GRPC_PORT"])
    service = one(PLAIN, "Service")
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert targets == {"http": "http", "grpc": "grpc"}
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    assert annotations["prometheus.io/path"] in _routes()


def _routes() -> set[str]:
    """The operations routes of the server (/livez, /readyz, /metrics, ...)."""
    return {getattr(r, "path", "") for r in health.router.routes}


@pytest.mark.parametrize("container", [SERVER, KSERVE_SERVER], ids=["deployment", "kserve"])
def test_probes_ask_routes_the_server_has_on_its_port(container: dict[str, Any]) -> None:
    routes = _routes()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == _server_port(container)


def test_the_grace_period_covers_the_pause_and_both_drains() -> None:
    pause = SERVER["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pause + GRACEFUL_SHUTDOWN_S + STOP_GRACE_S
    assert POD["terminationGracePeriodSeconds"] > needed


def test_the_server_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    image_user = int(STAGES["runtime"].args("USER")[-1].split(":")[0])
    assert image_user != 0
    context = POD["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == image_user
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    train_user = int(STAGES["train"].args("USER")[-1].split(":")[0])
    job_pod = JOB["spec"]["template"]["spec"]
    assert job_pod["securityContext"]["runAsUser"] == train_user
    assert KSERVE_SERVER["securityContext"]["runAsUser"] == image_user
    for container in [SERVER, KSERVE_SERVER, *job_pod["containers"]]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    for pod in (POD, job_pod):
        assert pod["automountServiceAccountToken"] is False
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts, "a read-only root needs a writable /tmp"
    assert POD["enableServiceLinks"] is False


def test_images_are_the_dockerfiles_targets() -> None:
    assert SERVER["image"] == KSERVE_SERVER["image"] == "mmoe-ranking:serve"
    assert JOB_CONTAINER["image"] == "mmoe-ranking:train"


def test_every_container_has_cpu_and_memory_requests_and_limits() -> None:
    def amount(q: str) -> float:
        units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?", q)
        assert m, q
        return float(m.group(1)) * units.get(m.group(2) or "", 1)

    for doc in PLAIN + KSERVE:
        for container in _containers(doc):
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                request = amount(resources["requests"][kind])
                assert 0 < request <= amount(resources["limits"][kind]), (doc["kind"], kind)


@pytest.mark.parametrize("container", [SERVER, KSERVE_SERVER], ids=["deployment", "kserve"])
def test_the_environment_is_valid_settings(container: dict[str, Any]) -> None:
    variables = env(container)
    names = {f"MMOE_{n.upper()}": n for n in Settings.model_fields}
    assert set(variables) <= set(names), "the server ignores unknown MMOE_* variables"
    settings = Settings.model_validate({names[k]: v for k, v in variables.items()})
    served = settings.model_repository or settings.model_path
    assert served.is_absolute()


def test_the_deployment_serves_the_repository_and_reads_it_again() -> None:
    settings = Settings.model_validate(
        {k.removeprefix("MMOE_").lower(): v for k, v in env(SERVER).items()}
    )
    assert settings.model_repository == Path(REPOSITORY)
    # A version copied onto the volume is picked up without a restart, by every replica.
    assert 0 < settings.repository_poll_s <= 60
    assert "MMOE_MODEL_PATH" not in env(SERVER), "unused beside a repository: misleading"


def test_the_model_volume_is_read_only_for_the_servers_and_written_by_the_job() -> None:
    claim = PVC["metadata"]["name"]
    volumes = {v["name"]: v for v in POD["volumes"]}
    (mount,) = [
        m for m in SERVER["volumeMounts"] if volumes[m["name"]].get("persistentVolumeClaim")
    ]
    assert mount == SERVER_MOUNT
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
    assert mount["readOnly"] is True
    assert REPOSITORY.is_relative_to(mount["mountPath"]), "the repository is on the volume"
    job_pod = JOB["spec"]["template"]["spec"]
    job_claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in job_pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert list(job_claims.values()) == [claim]
    (job_mount,) = [m for m in JOB_CONTAINER["volumeMounts"] if m["name"] in job_claims]
    assert job_mount["mountPath"] == mount["mountPath"], "one path for the Job and the servers"
    script = " ".join(JOB_CONTAINER["command"])
    config = re.search(r"--config (\S+)", script)
    assert config and (ROOT / config.group(1)).is_file(), "the Job trains a config we ship"
    # whole or not at all: written beside the final name, then renamed
    assert "mv /models/.model.onnx.partial /models/model.onnx" in script
    version_1 = REPOSITORY / "demo" / "1"
    assert f"mv {version_1}/.{MODEL_FILE}.partial {version_1}/{MODEL_FILE}" in script


def test_the_job_puts_the_model_file_and_version_1_in_the_repository_once(
    tmp_path: Path,
) -> None:
    """The Job's script, run with a stub `mmoe`: the file KServe reads and version 1 of `demo`
    where the servers look for it; nothing again on a volume that holds them; only the
    repository entry on a volume from before the repository; a repository that holds a model
    of its own left alone."""
    volume = tmp_path / "models"
    repo = volume / REPOSITORY.relative_to(SERVER_MOUNT["mountPath"])
    storage = re.fullmatch(r"pvc://[^/]+/(.+)", ISVC["spec"]["predictor"]["model"]["storageUri"])
    assert storage
    command = JOB_CONTAINER["command"]

    assert run_model_job(command, tmp_path) == ["data", "train", "export"]
    listing = scan(repo)
    assert not listing.errors
    assert {name: sorted(found) for name, found in listing.versions.items()} == {"demo": [1]}
    # the version before the newest stays loaded: a refused version 2 leaves 1 serving
    assert listing.policies["demo"].select([1, 2]) == {1, 2}
    version_1 = repo / "demo" / "1" / MODEL_FILE
    assert (volume / storage.group(1)).read_bytes() == version_1.read_bytes()
    assert not [p.name for p in volume.rglob(".*")], "a staged file left behind"

    assert run_model_job(command, tmp_path) == []  # all there: nothing to do

    shutil.rmtree(repo)  # a volume filled before the servers read a repository
    assert run_model_job(command, tmp_path) == []
    assert (repo / "demo" / "1" / MODEL_FILE).is_file()

    shutil.rmtree(repo)  # a repository with a model of its own
    (repo / "ranker" / "3").mkdir(parents=True)
    (repo / "ranker" / "3" / MODEL_FILE).write_text("mine")
    assert run_model_job(command, tmp_path) == []
    assert sorted(scan(repo).versions) == ["ranker"]


# ------------------------------------------------------------------------------ the docs


def doc_commands() -> list[list[str]]:
    """The command lines of docs/kubernetes.md's bash blocks, as argv lists."""
    return bash_commands(DOCS.read_text())


def _objects() -> set[tuple[str, str]]:
    return {(d["kind"].lower(), d["metadata"]["name"]) for d in PLAIN + KSERVE}


def test_the_docs_commands_match_the_files() -> None:
    commands = doc_commands()
    objects = _objects()
    service = one(PLAIN, "Service")
    service_ports = {p["port"] for p in service["spec"]["ports"]}
    images = {c["image"] for d in PLAIN for c in _containers(d)}
    forwarded: set[int] = set()
    applied = set()
    for argv in commands:
        text = shlex.join(argv)
        for path in re.findall(r"\bdeploy/\S+", text):
            assert (ROOT / path).exists(), f"{text}: no {path}"
        if argv[:2] == ["docker", "build"]:
            target = argv[argv.index("--target") + 1] if "--target" in argv else list(STAGES)[-1]
            tag = argv[argv.index("-t") + 1]
            assert target in STAGES, text
            assert tag in images, f"{text}: the manifests use {images}"
        elif argv[:2] == ["kubectl", "apply"]:
            flag = "-k" if "-k" in argv else "-f"
            applied.add(argv[argv.index(flag) + 1])
        elif argv[:2] == ["kubectl", "port-forward"]:
            kind, name = argv[2].split("/")
            assert (kind, name) == ("svc", service["metadata"]["name"]), text
            for pair in argv[3:]:
                local, remote = map(int, pair.split(":"))
                assert remote in service_ports, text
                forwarded.add(local)
        elif argv[0] == "kubectl":
            for ref in re.findall(r"\b(job|deployment|inferenceservice)/([\w-]+)", text):
                assert ref in objects, f"{text}: no {ref[0]} {ref[1]}"
            if argv[1:3] == ["get", "inferenceservice"]:
                assert ("inferenceservice", argv[3]) in objects, text
            if "persistentVolumeClaim" in text:
                assert f'"claimName": "{PVC["metadata"]["name"]}"' in text, text
        elif argv[0] == "curl":
            for port in re.findall(r"localhost:(\d+)", text):
                assert int(port) in forwarded, f"{text}: port {port} is not forwarded"
    assert {"deploy/k8s", "deploy/k8s/kserve"} <= applied
    for path in re.findall(r"`(deploy/[\w/.-]+)`", DOCS.read_text()):
        assert (ROOT / path).exists(), f"docs/kubernetes.md names {path}, which does not exist"


def test_the_docs_put_files_whole_where_the_servers_read_them() -> None:
    """The helper pod's copies: each written beside its final name under a dot name (which
    the servers ignore), then renamed, to the file KServe reads, a version of a model the Job
    writes, or routing.yaml, on the volume as the servers mount it."""
    storage = re.fullmatch(r"pvc://[^/]+/(.+)", ISVC["spec"]["predictor"]["model"]["storageUri"])
    assert storage
    mount_path: str | None = None
    staged: set[PurePosixPath] = set()
    placed: set[str] = set()
    for argv in doc_commands():
        text = shlex.join(argv)
        if argv[:2] == ["kubectl", "run"]:
            (overrides,) = [a.split("=", 1)[1] for a in argv if a.startswith("--overrides=")]
            (container,) = json.loads(overrides)["spec"]["containers"]
            (mount,) = container["volumeMounts"]
            mount_path = mount["mountPath"]
            assert mount_path == SERVER_MOUNT["mountPath"], text
        elif argv[:2] == ["kubectl", "cp"]:
            staged.add(PurePosixPath(argv[3].partition(":")[2]))
        elif argv[:2] == ["kubectl", "exec"] and argv[3:5] == ["--", "mv"]:
            source, target = map(PurePosixPath, argv[5:])
            assert source in staged, f"{text}: not copied before"
            assert source.parent == target.parent and source.name.startswith("."), text
            assert mount_path is not None, f"{text}: before the helper pod"
            if target == PurePosixPath(mount_path, storage.group(1)):
                placed.add("kserve")
            elif target == REPOSITORY / ROUTING_FILE:
                placed.add("routing")
            else:
                name, version, file = target.relative_to(REPOSITORY).parts
                assert (name, file) == ("demo", MODEL_FILE) and version.isdigit(), text
                placed.add("version")
        elif argv[:2] == ["kubectl", "exec"]:
            for path in re.findall(r"(?<![\w.])/\S+", text):
                assert PurePosixPath(path).is_relative_to(REPOSITORY), text
    assert placed == {"kserve", "version", "routing"}


def test_the_docs_routing_file_routes_the_jobs_model() -> None:
    (text,) = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    routing = parse_routing(text)
    assert routing.default == "demo" and set(routing.models) == {"demo"}
    assert routing.pinned()["demo"] == {"1", "2"}


def test_the_docs_table_lists_every_manifest() -> None:
    named = set(re.findall(r"`(deploy/k8s/[\w/.-]+\.yaml)`", DOCS.read_text()))
    manifests = {
        str(p.relative_to(ROOT)) for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"
    }
    assert manifests <= named, manifests - named

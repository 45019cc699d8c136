"""The Helm chart, offline: lint, render, Kubernetes schemas, serveConfigV2 = serve_config(), values schema."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from specray.cluster.app.serve_config import serve_config
from specray.cluster.runtime.config import ClusterConfig
from specray.cluster.runtime.node_roles import NODE_ROLES

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "specray"
GPU_EXAMPLE = CHART / "examples" / "gpu-production.yaml"
NAMESPACE = "llm"
K8S_VERSION = "1.30.0"  # the oldest version whose schemas we validate against; the chart needs >= 1.25
REPOSITORY = {"image": {"repository": "registry.example.com/team/specray"}}
# The chart's defaults with the one required value (the operator's image), and the GPU example
# (which names the same repository).
CASES = {"default": REPOSITORY, "gpu-production": yaml.safe_load(GPU_EXAMPLE.read_text())}


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(chart: helm.Chart, values: dict) -> list[dict]:
    manifests = chart.render(values, name="specray", namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def only(resources: list[dict], kind: str) -> dict:
    [resource] = [r for r in resources if r["kind"] == kind]
    return resource


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case: str) -> None:
    report = helm.lint(CHART, CASES[case], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("case", CASES)
def test_core_resources_validate_strictly(chart: helm.Chart, case: str) -> None:
    for resource in render(chart, CASES[case]):
        if resource["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1"):
            continue  # CRDs: kubernetes-validate has no schema; their pod templates are checked below
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_rayservice_pod_templates_validate_strictly(chart: helm.Chart, case: str) -> None:
    cluster = only(render(chart, CASES[case]), "RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        # A PodTemplate is a core kind holding exactly a pod template spec, so its schema applies.
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        kubernetes_validate.validate(
            {**pod_template, "template": group["template"]}, K8S_VERSION, strict=True
        )
        for value in group["rayStartParams"].values():
            assert isinstance(value, str)  # KubeRay takes only strings here
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["draft", "verifier"]


def test_expected_resources_for_the_gpu_example(chart: helm.Chart) -> None:
    kinds = sorted((r["kind"], r["metadata"]["name"]) for r in render(chart, CASES["gpu-production"]))
    assert kinds == [
        ("Ingress", "specray"),
        ("RayService", "specray"),
        ("Service", "specray-grpc"),
        ("Service", "specray-http"),
        ("Service", "specray-redis"),
        ("ServiceMonitor", "specray"),
        ("StatefulSet", "specray-redis"),
    ]


def test_gpu_example_places_pools(chart: helm.Chart) -> None:
    resources = render(chart, CASES["gpu-production"])
    cluster = only(resources, "RayService")["spec"]["rayClusterConfig"]
    draft, verifier = cluster["workerGroupSpecs"]
    assert (verifier["minReplicas"], verifier["maxReplicas"]) == (2, 8)
    verifier_pod = verifier["template"]["spec"]
    assert verifier_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert verifier_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in draft["template"]["spec"]["containers"][0]["resources"]["limits"]
    # `ray start --resources` gets a quoted JSON object that the pools' resources refer to.
    assert json.loads(json.loads(verifier["rayStartParams"]["resources"])) == {"specray_verifier": 1}
    env = {e["name"]: e for e in verifier_pod["containers"][0]["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4317"
    assert "deployment.environment=production" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    assert env["SPECRAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "specray-api-key"
    assert env["SPECRAY_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "specray-redis"
    assert verifier_pod["volumes"][-1]["persistentVolumeClaim"]["claimName"] == "specray-models"
    redis = only(resources, "StatefulSet")
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"


@pytest.mark.parametrize("case", CASES)
def test_serve_config_is_what_specray_serve_builds(chart: helm.Chart, case: str, tmp_path: Path) -> None:
    merged = chart.merge_values(CASES[case])
    rayservice = only(render(chart, CASES[case]), "RayService")
    # The equivalent cluster YAML: the chart's specray values plus the two keys the chart owns.
    redis_url = f"redis://:${{SPECRAY_REDIS_PASSWORD}}@specray-redis.{NAMESPACE}.svc:6379/0"
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump({**merged["specray"], "host": "0.0.0.0", "redis_url": redis_url}))
    expected = serve_config(ClusterConfig.from_yaml(config_file))
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == expected


@pytest.mark.parametrize("case", CASES)
def test_worker_groups_advertise_the_node_roles_resources_and_hold_their_pools(
    chart: helm.Chart, case: str
) -> None:
    """Each group's `ray start --resources` is its node role's (what `specray cluster up` gives a
    local node), each pool asks for one unit of it per replica, and the group's pods at their most
    hold the pool at its most."""
    merged = chart.merge_values(CASES[case])
    cluster = only(render(chart, CASES[case]), "RayService")["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]} | {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    config = ClusterConfig.model_validate(merged["specray"])
    for name, role in NODE_ROLES.items():
        assert json.loads(json.loads(groups[name]["rayStartParams"]["resources"])) == role.node_resources
        pool = getattr(config, role.pool)
        assert pool.resources == role.replica_resources, role.pool
        if name != "head":
            most = pool.autoscaling.max_replicas if pool.autoscaling else pool.num_replicas
            assert groups[name]["maxReplicas"] * role.per_node >= most, (name, most)


def test_the_local_multinode_config_pins_the_pools_as_the_chart_does() -> None:
    config = ClusterConfig.from_yaml(REPO / "cluster" / "multinode.yaml")
    for role in NODE_ROLES.values():
        assert getattr(config, role.pool).resources == role.replica_resources, role.pool


def test_external_redis_url_goes_through(chart: helm.Chart) -> None:
    url = "redis://:${SPECRAY_REDIS_PASSWORD}@redis.example:6379/2"
    values = {"redis": {"enabled": False, "external": {"url": url, "passwordSecret": {"name": "ext"}}}}
    resources = render(chart, {**values, **REPOSITORY})
    assert not [r for r in resources if r["kind"] == "StatefulSet"]
    app = yaml.safe_load(only(resources, "RayService")["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["redis_url"] == url


BAD_VALUES = [
    (
        {"specray": {"num_speculative_tokens": 99}},
        "/specray/num_speculative_tokens': maximum: got 99, want 32",
    ),
    ({"specray": {"host": "127.0.0.1"}}, "additional properties 'host' not allowed"),
    (
        {"specray": {"draft_workers": {"autoscaling": {"max_replicas": 0}}}},
        "/specray/draft_workers/autoscaling/max_replicas': minimum: got 0, want 1",
    ),
    ({"draft": {"maxReplicas": "four"}}, "/draft/maxReplicas': got string, want integer"),
    ({"models": {"source": "pvc"}}, "/models/pvc/claimName': minLength"),
    ({"redis": {"enabled": False}}, "/redis/external/url': minLength"),
    ({"telemetry": {"otel": {"endpoint": "collector:4317"}}}, "/telemetry/otel/endpoint'"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_bad_values_are_refused_with_a_clear_message(chart: helm.Chart, values: dict, message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.render({**REPOSITORY, **values}, name="specray", namespace=NAMESPACE)
    assert message in str(refused.value)


def test_min_above_max_replicas_is_refused(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmError) as refused:
        render(chart, {**REPOSITORY, "verifier": {"minReplicas": 3, "maxReplicas": 2}})
    assert "verifier.minReplicas (3) must be <= verifier.maxReplicas (2)" in str(refused.value)


def test_the_image_repository_is_the_operator_s_own(chart: helm.Chart) -> None:
    assert chart.merge_values({})["image"]["repository"] == ""  # no registry of the project's
    with pytest.raises(helm.HelmError) as refused:
        render(chart, {})
    assert "image.repository is required" in str(refused.value)


def _images(resources: list[dict]) -> set[str]:
    cluster = only(resources, "RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}


def test_default_tags_are_the_ones_make_images_builds(chart: helm.Chart) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert app_version == version
    repository = REPOSITORY["image"]["repository"]
    assert _images(render(chart, CASES["default"])) == {f"{repository}:{version}"}
    assert _images(render(chart, CASES["gpu-production"])) == {f"{repository}:{version}-cuda"}
    # `make images REGISTRY=...` tags the CPU and CUDA builds exactly so.
    build = subprocess.run(
        ["make", "-s", "-n", "images", "REGISTRY=registry.example.com/team"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert build == [
        f"docker build --build-arg VARIANT=cpu -t {repository}:{version} .",
        f"docker build --build-arg VARIANT=cuda -t {repository}:{version}-cuda .",
    ]

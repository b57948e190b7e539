"""deploy/kubernetes/, checked offline against the Kubernetes OpenAPI schemas and against the gateway itself.

kubernetes-validate (PyPI, maintained with every Kubernetes release) bundles the JSON schemas generated from
Kubernetes' OpenAPI; the strict variant refuses unknown fields, as `kubectl apply --validate=strict` does.
Every manifest is validated for the newest Kubernetes these tests know and for 1.30, the oldest one the
manifests are for (the `sleep` preStop action is on by default from 1.30). The rest checks what a schema
cannot: the sidecar layout, probes, secrets, resources, the shutdown grace read from the ConfigMap's config
by gateway.config itself (so that config is valid too), and the PodDisruptionBudget.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import SECRET_ENV, Settings, load_settings
from tests.support import ROOT

MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SECRET_NAMES = (*SECRET_ENV, "GATEWAY__ALERTS__WEBHOOK_SECRET")  # PRODUCT.md §1, and §2's alert webhook key
REQUIRED_SECRETS = {"REDIS_URL", "DATABASE_URL"}  # without them the gateway would fall back to dev defaults
IMAGE_UID = 10001  # the Dockerfile's `useradd --uid`
# Values for the secrets when the ConfigMap's config is parsed here: only their shape matters.
FAKE_SECRETS = {
    "REDIS_URL": "redis://redis:6379/0",
    "DATABASE_URL": "postgresql+asyncpg://gateway@postgres:5432/gateway",
    "GATEWAY_JWT_HS256_SECRET": "k8s-test-only-hs256-secret-0123456789abcdef",
    "STRIPE_API_KEY": "sk_test_k8s_only",
    "STRIPE_WEBHOOK_SECRET": "whsec_k8s_only",
    "GATEWAY_ADMIN_TOKENS": "ops:k8s-test-only-admin-token",
}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCUMENTS = _documents()


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in DOCUMENTS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _pod(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = _one(kind, name)["spec"]["template"]["spec"]
    return spec


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (container,) = [c for c in pod["containers"] if c["name"] == name]
    return container


def _port(container: dict[str, Any], name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name_or_number]
    return int(port)


def _gateway_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) for every container that runs the cosmos-gateway image."""
    found = []
    for _, doc in DOCUMENTS:
        if doc["kind"] in {"Deployment", "Job"}:
            pod = doc["spec"]["template"]["spec"]
            found += [(doc["metadata"]["name"], pod, c) for c in pod["containers"]
                      if c["image"].startswith("cosmos-gateway:")]
    return found


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The ConfigMap's config.yaml as the gateway reads it, with the Secret's variables set."""
    path = tmp_path_factory.mktemp("configmap") / "config.yaml"
    path.write_text(_one("ConfigMap", "cosmos-gateway-config")["data"]["config.yaml"], encoding="utf-8")
    return load_settings(path, env=FAKE_SECRETS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("file", "doc"), DOCUMENTS, ids=[f"{f}:{d['kind']}" for f, d in DOCUMENTS])
def test_manifest_is_valid_for_kubernetes(file: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_refuses_unknown_fields() -> None:
    # The validation above means something only if an unknown field fails it.
    doc = copy.deepcopy(_one("Deployment", "cosmos-gateway"))
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_expected_objects_exist() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in DOCUMENTS)
    assert kinds == sorted([
        ("ConfigMap", "cosmos-gateway-config"), ("Deployment", "cosmos-gateway"),
        ("Deployment", "cosmos-gateway-sync"), ("Job", "cosmos-gateway-db-upgrade"),
        ("NetworkPolicy", "cosmos-gateway"), ("PodDisruptionBudget", "cosmos-gateway"),
        ("PodDisruptionBudget", "cosmos-gateway-sync"), ("Service", "cosmos-gateway"),
    ])


def test_the_gateway_is_a_sidecar_of_the_api(settings: Settings) -> None:
    pod = _pod("Deployment", "cosmos-gateway")
    assert sorted(c["name"] for c in pod["containers"]) == ["cosmosbuilder-api", "gateway"]
    gateway, api = _container(pod, "gateway"), _container(pod, "cosmosbuilder-api")
    assert gateway["args"] == ["serve"]
    # The config's listeners are the ports the container declares; the upstream is the API on the Pod's loopback.
    assert settings.listen.proxy.port == _port(gateway, "proxy")
    assert settings.listen.admin.port == _port(gateway, "admin")
    assert settings.upstream.url == f"http://127.0.0.1:{_port(api, 'api')}"


def test_the_service_publishes_only_the_proxy_port() -> None:
    deployment = _one("Deployment", "cosmos-gateway")
    service = _one("Service", "cosmos-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    gateway = _container(deployment["spec"]["template"]["spec"], "gateway")
    targets = [_port(gateway, p["targetPort"]) for p in service["spec"]["ports"]]
    assert targets == [_port(gateway, "proxy")]
    # No other Service in the set selects these Pods (the admin port stays private).
    services = [d for _, d in DOCUMENTS if d["kind"] == "Service"]
    assert services == [service]


def test_the_network_policy_admits_the_admin_port_only_from_labelled_pods() -> None:
    policy = _one("NetworkPolicy", "cosmos-gateway")
    gateway = _container(_pod("Deployment", "cosmos-gateway"), "gateway")
    admin, proxy = _port(gateway, "admin"), _port(gateway, "proxy")
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]}
    assert open_ports == {proxy}
    admin_rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == admin for p in r["ports"])]
    assert admin_rules and all(r["from"] and all("podSelector" in f for f in r["from"]) for r in admin_rules)


def test_probes_ask_healthz_and_readyz_on_the_admin_listener() -> None:
    gateway = _container(_pod("Deployment", "cosmos-gateway"), "gateway")
    admin = _port(gateway, "admin")
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _port(gateway, gateway["livenessProbe"]["httpGet"]["port"]) == admin
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert _port(gateway, gateway["readinessProbe"]["httpGet"]["port"]) == admin
    sync = _container(_pod("Deployment", "cosmos-gateway-sync"), "sync")
    listen = sync["args"][sync["args"].index("--metrics-listen") + 1]
    for probe in ("livenessProbe", "readinessProbe"):
        assert sync[probe]["httpGet"]["path"] == "/healthz"
        assert _port(sync, sync[probe]["httpGet"]["port"]) == int(listen.rpartition(":")[2])


def test_sigterm_grace_covers_the_gateway_drain(settings: Settings) -> None:
    pod = _pod("Deployment", "cosmos-gateway")
    gateway, api = _container(pod, "gateway"), _container(pod, "cosmosbuilder-api")
    pause = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_ends = pause + settings.server.shutdown_grace_seconds
    assert pod["terminationGracePeriodSeconds"] >= drain_ends
    # The API gets SIGTERM with the gateway: it must outlast the drain, and not the whole grace period.
    assert drain_ends <= api["lifecycle"]["preStop"]["sleep"]["seconds"] < pod["terminationGracePeriodSeconds"]
    sync_pod = _pod("Deployment", "cosmos-gateway-sync")
    assert sync_pod["terminationGracePeriodSeconds"] >= settings.server.shutdown_grace_seconds


def test_every_secret_comes_from_a_secret_key_ref() -> None:
    containers = _gateway_containers()
    assert sorted(w for w, _, _ in containers) == ["cosmos-gateway", "cosmos-gateway-db-upgrade",
                                                    "cosmos-gateway-sync"]
    for workload, _, container in containers:
        env = {e["name"]: e for e in container["env"]}
        for name in SECRET_NAMES:
            assert "value" not in env[name], f"{workload}: {name} must not be written into the manifest"
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("cosmos-gateway-secrets", name), workload
            if name in REQUIRED_SECRETS:
                assert not ref.get("optional", False), f"{workload}: {name} is required"


def test_every_gateway_container_reads_the_configmap() -> None:
    for workload, pod, container in _gateway_containers():
        config = {e["name"]: e.get("value") for e in container["env"]}["GATEWAY_CONFIG"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = [m for m in container["volumeMounts"] if config.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(mounts) == 1, workload
        source = volumes[mounts[0]["name"]]["configMap"]["name"]
        assert source == "cosmos-gateway-config"
        assert Path(config).name in _one("ConfigMap", source)["data"]


def test_gateway_containers_run_as_the_images_user_with_a_writable_spool(settings: Settings) -> None:
    for workload, _, container in _gateway_containers():
        security = container["securityContext"]
        # runAsNonRoot alone cannot be checked by the kubelet against the image's named USER.
        assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID, workload
    gateway = _container(_pod("Deployment", "cosmos-gateway"), "gateway")
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    spool = Path(settings.redis.spool_dir)
    assert any(spool.is_relative_to(m["mountPath"]) for m in gateway["volumeMounts"] if not m.get("readOnly"))


def test_every_container_has_resources() -> None:
    for _, doc in DOCUMENTS:
        if doc["kind"] not in {"Deployment", "Job"}:
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), container["name"]
            assert "memory" in resources["limits"], container["name"]
    # docs/benchmarks.md: ~0.2 CPU per 1,000 metered req/s; the request is sized for that rate plus headroom.
    gateway = _container(_pod("Deployment", "cosmos-gateway"), "gateway")
    assert _cpu(gateway["resources"]["requests"]["cpu"]) >= 0.2


def test_disruption_budgets_leave_room_for_a_drain() -> None:
    for name in ("cosmos-gateway", "cosmos-gateway-sync"):
        deployment, budget = _one("Deployment", name), _one("PodDisruptionBudget", name)
        assert budget["spec"]["selector"] == deployment["spec"]["selector"]
        replicas = deployment["spec"]["replicas"]
        assert replicas >= 2, name
        if "minAvailable" in budget["spec"]:
            assert 1 <= budget["spec"]["minAvailable"] < replicas, name  # equal would block every drain
        else:
            assert budget["spec"]["maxUnavailable"] >= 1, name


def test_the_sync_worker_and_the_migration_job() -> None:
    sync = _one("Deployment", "cosmos-gateway-sync")
    assert _container(sync["spec"]["template"]["spec"], "sync")["args"][0] == "sync"
    job = _one("Job", "cosmos-gateway-db-upgrade")
    pod = job["spec"]["template"]["spec"]
    assert _container(pod, "db-upgrade")["args"] == ["db", "upgrade"]
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["backoffLimit"] >= 1

"""The Helm chart deploy/helm/cdc-service, checked with no cluster.

`helm lint --strict` and `helm template` on the default values and on each values file in the chart's ci/ folder;
every rendered manifest is validated against the Kubernetes JSON schemas (kubernetes-validate, strict); then the
properties that matter are asserted: probes, security context, resources, the settings files and the CDC_* variables
(loaded back through the service's own settings loader), the checksum annotations, the drain deadline, HPA, PDB,
existingSecret and the Prometheus Operator and Grafana objects.

helm comes from tools/install_helm.sh (`make test` runs it). Without helm these tests are skipped, except under CI,
where a missing helm is an error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cdc_service import config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "cdc-service"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# Values every install needs (a non-loopback redis.url); "the defaults" below means the chart's values plus these.
REQUIRED = Path(__file__).resolve().parent / "required-values.yaml"
K8S_VERSION = "1.30"
# The chart's kubeVersion floor and a current release: every object must validate against both.
K8S_VERSIONS = ("1.25", "1.30")
RELEASE = "cdc"
NAME = "cdc-cdc-service"  # the full name of release "cdc"
CONFIG_DIR = "/etc/cdc-service"


def _find_helm() -> str | None:
    """$HELM when set, else the venv's helm (tools/install_helm.sh puts it there), else helm on PATH."""
    explicit = os.environ.get("HELM")
    candidates = [explicit] if explicit else [str(Path(sys.executable).parent / "helm"), shutil.which("helm")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


HELM = _find_helm()
if HELM is None:
    if os.environ.get("CI"):
        raise RuntimeError(
            "helm not found under CI: tools/install_helm.sh (run by `make test`) should have installed it"
        )
    pytestmark = pytest.mark.skip(reason="helm not found: run tools/install_helm.sh (make test does) or set HELM")


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, check=False)


def _values_args(values: dict[str, Any] | None, files: tuple[Path, ...], tmp: Path | None) -> list[str]:
    args = [arg for f in (REQUIRED, *files) for arg in ("-f", str(f))]
    if values is not None:
        assert tmp is not None
        path = tmp / f"values-{len(list(tmp.glob('values-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    return args


def template(
    values: dict[str, Any] | None = None,
    *files: Path,
    tmp: Path | None = None,
    release: str = RELEASE,
    kube_version: str | None = None,
) -> subprocess.CompletedProcess[str]:
    version = ["--kube-version", kube_version] if kube_version else []
    return helm("template", release, str(CHART), "--namespace", "cdc", *version, *_values_args(values, files, tmp))


def render(
    values: dict[str, Any] | None = None,
    *files: Path,
    tmp: Path | None = None,
    release: str = RELEASE,
    kube_version: str | None = None,
) -> list[dict[str, Any]]:
    result = template(values, *files, tmp=tmp, release=release, kube_version=kube_version)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def hooks(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]


def objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The release's objects, hooks left out."""
    return [d for d in docs if "helm.sh/hook" not in d["metadata"].get("annotations", {})]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = only(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(docs)["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(docs)["env"] if "value" in e}


def pod_annotations(docs: list[dict[str, Any]]) -> dict[str, str]:
    result: dict[str, str] = only(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    return result


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render()


def _ids(path: Path | None) -> str:
    return "default" if path is None else path.name


VALUE_SETS = [None, *CI_VALUES]


# ---------------------------------------------------------------------------------------------------------------
# Lint and Kubernetes schemas


def test_ci_values_files_exist() -> None:
    names = {p.name for p in CI_VALUES}
    assert {"hpa-values.yaml", "monitoring-values.yaml", "existing-secret-values.yaml", "tuned-values.yaml"} <= names


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=_ids)
def test_lint_strict(values_file: Path | None) -> None:
    """Each ci/ file stands alone (as chart-testing uses it); the defaults need the required values."""
    result = helm("lint", "--strict", str(CHART), "-f", str(values_file or REQUIRED))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout
    # helm lint reports a template's `fail` as [INFO] and passes: look for it.
    assert "Fail:" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert "[INFO]" not in result.stdout, result.stdout  # icon and maintainers are there


@pytest.mark.parametrize("values_file", CI_VALUES, ids=_ids)
def test_ci_values_render_alone(values_file: Path) -> None:
    result = helm("template", RELEASE, str(CHART), "-f", str(values_file))
    assert result.returncode == 0, result.stderr


def _check_servicemonitor(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc["spec"]
    assert set(spec) == {"selector", "endpoints"}
    assert spec["selector"]["matchLabels"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"]) and re.fullmatch(r"\d+[smh]", endpoint["scrapeTimeout"])


def _check_prometheusrule(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc["spec"]) == {"groups"}
    for group in doc["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule) and isinstance(rule["expr"], str), rule


# The fields of KEDA's ScaledObject (keda.sh/v1alpha1) and of its nats-jetstream trigger, as KEDA documents them.
_SCALEDOBJECT_SPEC = {
    "scaleTargetRef",
    "minReplicaCount",
    "maxReplicaCount",
    "pollingInterval",
    "cooldownPeriod",
    "advanced",
    "triggers",
}
_NATS_JETSTREAM_METADATA = {
    "natsServerMonitoringEndpoint",
    "account",
    "stream",
    "consumer",
    "lagThreshold",
    "activationLagThreshold",
    "useHttps",
}


def _check_scaledobject(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    spec = doc["spec"]
    assert set(spec) <= _SCALEDOBJECT_SPEC, set(spec) - _SCALEDOBJECT_SPEC
    assert set(spec["scaleTargetRef"]) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    assert all(isinstance(spec[k], int) for k in ("minReplicaCount", "maxReplicaCount") if k in spec)
    assert set(spec.get("advanced", {})) <= {
        "horizontalPodAutoscalerConfig",
        "restoreToOriginalReplicaCount",
        "scalingModifiers",
    }
    modifiers = spec.get("advanced", {}).get("scalingModifiers")
    if modifiers is not None:
        assert set(modifiers) <= {"formula", "target", "activationTarget", "metricType"}, modifiers
        assert all(isinstance(v, str) and v for v in modifiers.values()), modifiers
        # The formula refers to triggers by name.
        names = {t["name"] for t in spec["triggers"]}
        assert set(modifiers["formula"].split(" + ")) == names, (modifiers["formula"], names)
    for trigger in spec["triggers"]:
        assert set(trigger) <= {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}
        assert trigger["type"] == "nats-jetstream"
        metadata = trigger["metadata"]
        assert set(metadata) <= _NATS_JETSTREAM_METADATA, set(metadata) - _NATS_JETSTREAM_METADATA
        # KEDA's trigger metadata is a map of strings.
        assert all(isinstance(v, str) and v for v in metadata.values()), metadata


# The CRD kinds have no schema in kubernetes-validate; they get a small structural check instead.
CRD_CHECKS = {
    "ServiceMonitor": _check_servicemonitor,
    "PrometheusRule": _check_prometheusrule,
    "ScaledObject": _check_scaledobject,
}


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("values_file", VALUE_SETS, ids=_ids)
def test_rendered_manifests_validate_against_kubernetes_schemas(values_file: Path | None, k8s_version: str) -> None:
    docs = render(None, *([values_file] if values_file else []), kube_version=f"v{k8s_version}.0")
    assert {"Deployment", "ConfigMap", "Service"} <= {d["kind"] for d in docs}
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        if doc not in hooks(docs):
            assert labels["app.kubernetes.io/name"] == "cdc-service"
        if doc["kind"] in CRD_CHECKS:
            CRD_CHECKS[doc["kind"]](doc)
            continue
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_schema_validation_is_strict(tmp_path: Path) -> None:
    """The validator itself rejects an unknown field, so the test above can fail."""
    doc = only(render(), "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# The Deployment


def test_default_objects(default_docs: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in objects(default_docs))
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"]
    assert [d["kind"] for d in hooks(default_docs)] == ["Pod"]  # the `helm test` pod
    assert only(default_docs, "Deployment")["spec"]["replicas"] == 2


def test_probes(default_docs: list[dict[str, Any]]) -> None:
    c = container(default_docs)
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = only(default_docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"] == only(default_docs, "Deployment")["spec"]["selector"]["matchLabels"]


def test_security_context(default_docs: list[dict[str, Any]]) -> None:
    pod = pod_spec(default_docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container(default_docs)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # The only writable path is /tmp, an emptyDir; the settings are mounted read-only.
    mounts = {m["mountPath"]: m for m in container(default_docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == {CONFIG_DIR, "/tmp"}
    assert mounts[CONFIG_DIR]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_default_resources(default_docs: list[dict[str, Any]]) -> None:
    resources = container(default_docs)["resources"]
    assert resources["limits"] == {"cpu": "1", "memory": "512Mi"}
    assert resources["requests"]["memory"] == "512Mi"


def test_settings_files(default_docs: list[dict[str, Any]]) -> None:
    assert env(default_docs) == {
        "SETTINGS_FILES_FOR_DYNACONF": f"{CONFIG_DIR}/settings.toml,{CONFIG_DIR}/.secrets.toml",
        "CDC_NATS__URL": "nats://nats.nats:4222",  # from required-values.yaml
        "CDC_REDIS__URL": "redis://redis-master.redis:6379/0",
    }
    (volume,) = [v for v in pod_spec(default_docs)["volumes"] if v["name"] == "config"]
    sources = volume["projected"]["sources"]
    assert sources[0]["configMap"] == {"name": NAME, "items": [{"key": "settings.toml", "path": "settings.toml"}]}
    assert sources[1]["secret"] == {"name": NAME, "items": [{"key": ".secrets.toml", "path": ".secrets.toml"}]}
    # settingsToml defaults to the repository's settings.toml (compared as TOML: comments may differ).
    configmap = only(default_docs, "ConfigMap")
    assert tomllib.loads(configmap["data"]["settings.toml"]) == tomllib.loads((ROOT / "settings.toml").read_text())
    secret = only(default_docs, "Secret")
    assert tomllib.loads(secret["stringData"][".secrets.toml"]) == {
        "nats": {"password": "", "token": ""},
        "redis": {"password": ""},
    }


def test_checksums_change_with_settings(default_docs: list[dict[str, Any]], tmp_path: Path) -> None:
    base = pod_annotations(default_docs)
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/config"])
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/secret"])
    assert pod_annotations(render()) == base  # deterministic

    toml = (ROOT / "settings.toml").read_text()
    assert "batch_size = 256" in toml
    edited = toml.replace("batch_size = 256", "batch_size = 512")
    changed = pod_annotations(render({"settingsToml": edited}, tmp=tmp_path))
    assert changed["checksum/config"] != base["checksum/config"]
    assert changed["checksum/secret"] == base["checksum/secret"]

    rotated = pod_annotations(render({"secrets": {"redis": {"password": "new"}}}, tmp=tmp_path))
    assert rotated["checksum/secret"] != base["checksum/secret"]
    assert rotated["checksum/config"] == base["checksum/config"]


def test_tuned_values_reach_the_pod() -> None:
    docs = render(None, CHART / "ci" / "tuned-values.yaml")
    variables = env(docs)
    assert variables["CDC_WORKERS__POOL_SIZE"] == "8"
    assert variables["CDC_INGEST__BATCH_SIZE"] == "512"
    assert variables["CDC_INGEST__MAX_PAYLOAD_BYTES"] == "2097152"  # not 2.097152e+06
    assert variables["CDC_PUBLISH__MAX_HOLD"] == "30.5"
    assert json.loads(variables["CDC_NATS__URL"]) == ["nats://nats-0.nats:4222", "nats://nats-1.nats:4222"]
    assert json.loads(variables["CDC_INGEST__SUBJECTS"]) == ["sequin.changes.>"]
    assert variables["CDC_ROUTES__CHATS"] == "false"
    assert variables["CDC_ROUTES__CONTACTS__SUBJECT"] == "wa.{company}.{agent_id}.contacts"
    assert variables["CDC_LOG__LEVEL"] == "DEBUG"
    assert variables["TZ"] == "UTC"
    c = container(docs)
    assert c["image"] == "registry.example.com/cdc-service:1.2.3"
    assert c["ports"][0]["containerPort"] == 9090  # follows http.port
    assert only(docs, "Service")["spec"]["ports"][0]["port"] == 9090
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == 50
    assert only(docs, "Deployment")["spec"]["replicas"] == 4
    assert {"name": "nats-creds", "mountPath": "/etc/nats", "readOnly": True} in c["volumeMounts"]


# Non-default values for every string and list setting; numbers and booleans are derived from the defaults.
TEXT_SETTINGS: dict[str, Any] = {
    "nats.url": ["nats://n1:4222", "nats://n2:4222"],
    "nats.name": "cdc-test",
    "nats.user": "svc",
    "nats.creds_file": "/etc/nats/user.creds",
    "nats.nkey_seed_file": "/etc/nats/seed.nk",
    "nats.tls_ca_file": "/etc/nats/ca.pem",
    "nats.tls_cert_file": "/etc/nats/cert.pem",
    "nats.tls_key_file": "/etc/nats/key.pem",
    "ingest.stream": "cdc_in",
    "ingest.subjects": ["sequin.changes.>"],
    "ingest.subject_layout": "sequin.changes.{database}.{schema}.{table}.{action}",
    "ingest.durable": "cdc_d",
    "ingest.queue_group": "cdc_q",
    "ingest.deliver_subject": "deliver.cdc_q",
    "ingest.mode": "pull",
    "ingest.ordering": "replica",  # partitioned needs a "*" at the schema token, which "sequin.changes.>" lacks
    "ingest.partition_stream": "cdc_parts",
    "ingest.member_bucket": "cdc_m",
    "publish.stream": "wa_out",
    "publish.subjects": ["wa.>", "wb.>"],
    "dedup.key_prefix": "dd:",
    "dedup.routing_key_prefix": "rt:",
    "redis.url": "rediss://redis:6380/0",
    "redis.tls_ca_file": "/etc/redis/ca.pem",
    "redis.mode": "cluster",
    "dlq.stream": "dlq_out",
    "dlq.subject_prefix": "dead",
    "dlq.advisory_stream": "adv_out",
    "http.host": "::",
    "log.level": "DEBUG",
    "log.format": "console",
}
ROUTES = {
    "messages": {"subject": "wa.{company}.{agent_id}.msg.{chat_id}"},
    "chats": False,
    "contacts": {"pk": "contact_id", "subject": "wa.{company}.contacts", "columns": ["contact_id", "name"]},
}
SECRETS = {"nats": {"password": 'p"w\\d', "token": "tok"}, "redis": {"password": "rp"}}


def _non_default(key: str, default: Any) -> Any:
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default + 1.5
    return TEXT_SETTINGS[key]  # a KeyError names a new text setting that needs a value above


def test_every_setting_is_reachable_through_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set every setting through `settings` (and the credentials through `secrets`), render, then load the result
    with the service's own loader: the rendered files and variables must give exactly those values."""
    settings: dict[str, dict[str, Any]] = {}
    expected: dict[str, Any] = {}
    for section, cls in config._SECTIONS.items():
        for item in fields(cls):
            key = f"{section}.{item.name}"
            if key in config.SECRET_KEYS:
                continue
            value = _non_default(key, getattr(cls(), item.name))
            settings.setdefault(section, {})[item.name] = value
            expected[key] = tuple(value) if isinstance(value, list) else value
    settings["routes"] = ROUTES
    docs = render({"settings": settings, "secrets": SECRETS}, tmp=tmp_path)

    # The pod's /etc, under tmp_path: the mounted settings files, and the files that settings name (the loader
    # refuses a missing creds, key or CA file).
    def local(path: str) -> str:
        return path.replace("/etc/", f"{tmp_path}/etc/")

    files = {
        "settings.toml": only(docs, "ConfigMap")["data"]["settings.toml"],
        ".secrets.toml": only(docs, "Secret")["stringData"][".secrets.toml"],
    }
    for name, text in files.items():
        path = Path(local(f"{CONFIG_DIR}/{name}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for key, value in expected.items():
        if isinstance(value, str) and value.startswith("/etc/"):
            expected[key] = local(value)
            Path(expected[key]).parent.mkdir(parents=True, exist_ok=True)
            Path(expected[key]).write_text("")
    for name, value in env(docs).items():
        monkeypatch.setenv(name, local(value))
    monkeypatch.chdir(tmp_path)
    loaded = config.load_settings()

    for key, value in expected.items():
        section, name = key.split(".")
        assert getattr(getattr(loaded, section), name) == value, key
    assert loaded.nats.password == SECRETS["nats"]["password"]
    assert loaded.nats.token == "tok"
    assert loaded.redis.password == "rp"
    assert loaded.routes["contacts"].columns == {"contact_id", "name"}
    assert {t: (r.pk, r.template) for t, r in loaded.routes.items()} == {
        "messages": ("message_id", "wa.{company}.{agent_id}.msg.{chat_id}"),
        "agents": ("agent_id", "wa.{company}.{agent_id}.agents"),
        "contacts": ("contact_id", "wa.{company}.contacts"),
    }
    assert container(docs)["ports"][0]["containerPort"] == expected["http.port"]


def test_schema_lists_every_setting() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    settings = schema["properties"]["settings"]["properties"]
    assert set(settings) == {*config._SECTIONS, "routes"}
    for section, cls in config._SECTIONS.items():
        names = {f.name for f in fields(cls) if f"{section}.{f.name}" not in config.SECRET_KEYS}
        assert set(settings[section]["properties"]) == names, section
    secrets = schema["properties"]["secrets"]["properties"]
    assert {f"{s}.{k}" for s in ("nats", "redis") for k in secrets[s]["properties"]} == config.SECRET_KEYS


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"settings": {"workers": {"pool_siz": 4}}}, "pool_siz"),
        ({"settings": {"nats": {"password": "x"}}}, "password"),
        ({"settings": {"ingest": {"mode": "fast"}}}, "settings.ingest.mode"),
        ({"settings": {"ingest": {"batch_size": 0}}}, "settings.ingest.batch_size"),
        ({"settingsToml": "[nats\nurl = 1"}, "settingsToml is not valid TOML"),
        ({"replicas": 3}, "replicas"),
        ({"extraSettingsFiles": ["prod.toml"]}, "extraSettingsFiles.0"),
        ({"extraSettingsFiles": ["/etc/a.toml,/etc/b.toml"]}, "extraSettingsFiles.0"),
        ({"extraSettingsFiles": ["/etc/cdc/prod.ini"]}, "extraSettingsFiles.0"),
    ],
    ids=[
        "typo",
        "secret-in-settings",
        "enum",
        "minimum",
        "bad-toml",
        "unknown-value",
        "relative-settings-file",
        "comma-in-settings-file",
        "settings-file-format",
    ],
)
def test_bad_values_fail_to_render(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    result = template(values, tmp=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Drain deadline


def test_termination_grace_exceeds_the_drain_deadline(default_docs: list[dict[str, Any]]) -> None:
    grace = tomllib.loads((ROOT / "settings.toml").read_text())["shutdown"]["grace_seconds"]
    assert pod_spec(default_docs)["terminationGracePeriodSeconds"] > grace


@pytest.mark.parametrize(
    "values",
    [
        {"terminationGracePeriodSeconds": 20},
        {"terminationGracePeriodSeconds": 15},
        {"terminationGracePeriodSeconds": 24},
        {"settings": {"shutdown": {"grace_seconds": 30}}},
        {"settingsToml": "[shutdown]\ngrace_seconds = 45.0\n"},
    ],
    ids=["equal", "lower", "margin-under-5s", "grace-via-settings", "grace-via-settingsToml"],
)
def test_render_fails_when_termination_grace_is_too_short(values: dict[str, Any], tmp_path: Path) -> None:
    result = template(values, tmp=tmp_path)
    assert result.returncode != 0
    assert "terminationGracePeriodSeconds" in result.stderr and "must be at least 5 s greater than" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# HPA, PDB, existing Secret, monitoring


def test_an_external_autoscaler_owns_replicas_when_replica_count_is_null(tmp_path: Path) -> None:
    docs = render({"replicaCount": None}, tmp=tmp_path)
    assert "replicas" not in only(docs, "Deployment")["spec"]
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]


def test_hpa_replaces_replicas() -> None:
    docs = render(None, CHART / "ci" / "hpa-values.yaml")
    assert "replicas" not in only(docs, "Deployment")["spec"]
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]}
    assert targets == {"cpu": 60, "memory": 80}
    assert only(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2


def test_pdb(default_docs: list[dict[str, Any]]) -> None:
    pdb = only(default_docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    pod_labels = only(default_docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_existing_secret_is_used_instead_of_a_new_one() -> None:
    docs = render(None, CHART / "ci" / "existing-secret-values.yaml")
    kinds = {d["kind"] for d in docs}
    assert "Secret" not in kinds and "ServiceAccount" not in kinds and "PodDisruptionBudget" not in kinds
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "config"]
    secret = volume["projected"]["sources"][1]["secret"]
    assert secret == {"name": "cdc-credentials", "items": [{"key": "secrets.toml", "path": ".secrets.toml"}]}
    assert "checksum/secret" not in pod_annotations(docs)
    assert pod_spec(docs)["serviceAccountName"] == "cdc-runner"


def test_monitoring_objects() -> None:
    docs = render(None, CHART / "ci" / "monitoring-values.yaml")
    service = only(docs, "Service")
    monitor = only(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "15s")
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}

    rule = only(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The rule file as it stands, except the selector of the "service gone" alerts (see the next tests).
    expected = (
        (CHART / "files" / "alerts.yaml").read_text().replace('job="cdc-service"', f'job="{NAME}", namespace="cdc"')
    )
    assert rule["spec"] == yaml.safe_load(expected)

    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert len(dashboards) == 1
    dashboard = dashboards[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "CDC"}
    (body,) = dashboard["data"].values()
    assert json.loads(body) == json.loads((CHART / "files" / "dashboard.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# On a real cluster (issue: service links, drains, spread, guards, secrets, helm test, network policy, KEDA)


def _fails(values: dict[str, Any], tmp: Path, *fragments: str, files: tuple[Path, ...] = ()) -> str:
    result = template(values, *files, tmp=tmp)
    assert result.returncode != 0, f"rendered although it should not: {values}"
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


def test_no_service_links(default_docs: list[dict[str, Any]]) -> None:
    """Service links would put CDC_<SERVICE>_PORT=tcp://... into the environment of every pod in the namespace."""
    assert pod_spec(default_docs)["enableServiceLinks"] is False
    (test_pod,) = hooks(default_docs)
    assert test_pod["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize(
    "label", ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version", "helm.sh/chart"]
)
def test_pod_labels_cannot_override_the_charts_own(label: str, tmp_path: Path) -> None:
    _fails({"podLabels": {"team": "cdc", label: "other"}}, tmp_path, f"podLabels.{label}: the chart sets this label")


def test_pod_annotations_cannot_shadow_the_checksums(tmp_path: Path) -> None:
    _fails({"podAnnotations": {"checksum/secret": "0"}}, tmp_path, "podAnnotations.checksum/secret")
    _fails({"podAnnotations": {"checksum/anything": "0"}}, tmp_path, "podAnnotations.checksum/anything")
    docs = render({"podLabels": {"team": "cdc"}, "podAnnotations": {"example.com/x": "v"}}, tmp=tmp_path)
    template_meta = only(docs, "Deployment")["spec"]["template"]["metadata"]
    assert template_meta["labels"]["team"] == "cdc"
    assert template_meta["annotations"]["example.com/x"] == "v"


def test_version_label_follows_the_image_tag(tmp_path: Path) -> None:
    docs = render({"image": {"tag": "2.3.4-rc.1"}}, tmp=tmp_path)
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/version"] == "2.3.4-rc.1", doc["kind"]
    assert only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == (
        "2.3.4-rc.1"
    )
    default = only(render(), "Deployment")["metadata"]["labels"]["app.kubernetes.io/version"]
    assert default == yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["icon"].startswith("https://")
    assert chart["maintainers"] and all(m["name"] for m in chart["maintainers"])


DIGEST = "sha256:" + "ab" * 32


def test_image_digest_wins_over_the_tag(tmp_path: Path) -> None:
    docs = render({"image": {"repository": "reg.example.com/cdc", "tag": "1.0.0", "digest": DIGEST}}, tmp=tmp_path)
    assert container(docs)["image"] == f"reg.example.com/cdc@{DIGEST}"
    (test_pod,) = hooks(docs)
    assert test_pod["spec"]["containers"][0]["image"] == f"reg.example.com/cdc@{DIGEST}"
    assert container(render({"image": {"tag": "1.0.0"}}, tmp=tmp_path))["image"] == "cdc-service:1.0.0"
    _fails({"image": {"digest": "sha256:abc"}}, tmp_path, "image.digest")


# --- Drains and spread


@pytest.mark.parametrize(
    ("kube", "expected"), [("v1.25.0", None), ("v1.26.0", "AlwaysAllow"), ("v1.30.0", "AlwaysAllow")]
)
def test_pdb_lets_drains_evict_unready_pods(kube: str, expected: str | None) -> None:
    pdb = only(render(kube_version=kube), "PodDisruptionBudget")
    assert pdb["spec"].get("unhealthyPodEvictionPolicy") == expected
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def test_pdb_policy_can_be_left_to_the_api(tmp_path: Path) -> None:
    pdb = only(render({"podDisruptionBudget": {"unhealthyPodEvictionPolicy": ""}}, tmp=tmp_path), "PodDisruptionBudget")
    assert "unhealthyPodEvictionPolicy" not in pdb["spec"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}}, "set only one of minAvailable"),
        ({"replicaCount": 1, "podDisruptionBudget": {"minAvailable": 1}}, "minAvailable (1) is not below"),
        ({"replicaCount": 3, "podDisruptionBudget": {"minAvailable": 3}}, "minAvailable (3) is not below"),
        ({"podDisruptionBudget": {"minAvailable": "100%"}}, "minAvailable (100%) blocks every eviction"),
        ({"podDisruptionBudget": {"maxUnavailable": 0}}, "maxUnavailable (0) blocks every eviction"),
        ({"podDisruptionBudget": {"maxUnavailable": "0%"}}, "maxUnavailable (0%) blocks every eviction"),
        (
            {"autoscaling": {"enabled": True, "minReplicas": 2}, "podDisruptionBudget": {"minAvailable": 2}},
            "smallest replica count (2)",
        ),
        (
            {
                "keda": {"enabled": True, "natsServerMonitoringEndpoint": "n:8222", "minReplicas": 1},
                "podDisruptionBudget": {"minAvailable": 1},
            },
            "smallest replica count (1)",
        ),
        ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 4}}, "autoscaling.minReplicas (5)"),
        (
            {"keda": {"enabled": True, "natsServerMonitoringEndpoint": "n:8222", "minReplicas": 5, "maxReplicas": 4}},
            "keda.minReplicas (5)",
        ),
        (
            {"autoscaling": {"enabled": True}, "keda": {"enabled": True, "natsServerMonitoringEndpoint": "n:8222"}},
            "choose one autoscaler",
        ),
        ({"prometheusRule": {"lag": {"warningSeconds": 10, "criticalSeconds": 5}}}, "lag.criticalSeconds (5)"),
    ],
    ids=[
        "both-set",
        "one-replica-min-one",
        "min-equals-replicas",
        "min-100-percent",
        "max-zero",
        "max-zero-percent",
        "hpa-min",
        "keda-min",
        "hpa-min-over-max",
        "keda-min-over-max",
        "hpa-and-keda",
        "lag-critical-below-warning",
    ],
)
def test_disruption_and_scaling_guards(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    _fails(values, tmp_path, message)


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": 3, "podDisruptionBudget": {"minAvailable": 2}},
        {"replicaCount": None, "podDisruptionBudget": {"minAvailable": 1}},  # an external autoscaler: unknown
        {"replicaCount": 1},  # maxUnavailable 1 lets the single pod go
        {"podDisruptionBudget": {"minAvailable": "50%"}},
        {"podDisruptionBudget": {"maxUnavailable": "25%"}},
    ],
)
def test_pdbs_that_allow_evictions_render(values: dict[str, Any], tmp_path: Path) -> None:
    pdb = only(render(values, tmp=tmp_path), "PodDisruptionBudget")["spec"]
    assert len({"minAvailable", "maxUnavailable"} & set(pdb)) == 1


def test_default_topology_spread_is_soft_over_nodes_and_zones(default_docs: list[dict[str, Any]]) -> None:
    constraints = pod_spec(default_docs)["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    selector = only(default_docs, "Deployment")["spec"]["selector"]["matchLabels"]
    for c in constraints:
        assert c["whenUnsatisfiable"] == "ScheduleAnyway" and c["maxSkew"] == 1
        assert c["labelSelector"] == {"matchLabels": selector}


def test_topology_spread_can_be_replaced_or_turned_off(tmp_path: Path) -> None:
    mine = [{"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {}}]
    assert pod_spec(render({"topologySpreadConstraints": mine}, tmp=tmp_path))["topologySpreadConstraints"] == mine
    off = pod_spec(render({"defaultTopologySpread": {"enabled": False}}, tmp=tmp_path))
    assert "topologySpreadConstraints" not in off


# --- Render-time guards


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost:6379/0",
        "rediss://:secret-pw@127.0.0.2:6380/0",
        "redis://[::1]:6379/0",
        "redis://LOCALHOST",
    ],
)
def test_loopback_redis_url_is_refused(url: str, tmp_path: Path) -> None:
    stderr = _fails({"settings": {"redis": {"url": url}}}, tmp_path, "redis.url points at", "loopback")
    assert "secret-pw" not in stderr


def test_the_repository_default_redis_url_is_refused() -> None:
    """Without the required values, the chart's defaults (the repository's settings.toml) do not render."""
    result = helm("template", RELEASE, str(CHART))
    assert result.returncode != 0
    assert "settings redis.url points at 127.0.0.1" in result.stderr, result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]"])
def test_loopback_http_host_is_refused(host: str, tmp_path: Path) -> None:
    _fails({"settings": {"http": {"host": host}}}, tmp_path, "http.host", "is a loopback address")
    _fails({"settingsToml": f'[http]\nhost = "{host}"\n'}, tmp_path, "http.host")


def test_non_loopback_hosts_render(tmp_path: Path) -> None:
    values = {"settings": {"http": {"host": "::"}, "redis": {"url": "redis://redis-127.cache:6379/0"}}}
    assert env(render(values, tmp=tmp_path))["CDC_HTTP__HOST"] == "::"


def test_metrics_service_stays_inside_the_cluster_by_default(tmp_path: Path) -> None:
    _fails({"service": {"type": "LoadBalancer"}}, tmp_path, "service.type LoadBalancer", "allowExternal")
    _fails({"service": {"type": "NodePort"}}, tmp_path, "service.type NodePort")
    docs = render({"service": {"type": "NodePort", "allowExternal": True}}, tmp=tmp_path)
    assert only(docs, "Service")["spec"]["type"] == "NodePort"


# --- Secrets


def _expand(value: str, variables: dict[str, str]) -> str:
    """The kubelet's $(VAR) substitution of an env value (enough for the chart's own references)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: variables.get(m.group(1), m.group(0)), value)


@pytest.mark.parametrize(
    "password", ["hunter2", "1_000", "0x10", "true", '"quoted"', " lead and trail ", "a$(B)c", "@int 5", "@json x"]
)
def test_per_key_secret_reaches_the_loader_verbatim(
    password: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-key Secret: each key becomes CDC_<SECTION>__<KEY> with the value exactly as stored, even when it reads as
    another type or as a dynaconf marker."""
    docs = render(None, CHART / "ci" / "secret-keys-values.yaml")
    spec = pod_spec(docs)
    entries = container(docs)["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in entries if "valueFrom" in e}
    assert refs == {
        "SECRET_NATS_PASSWORD": {"name": "cdc-credentials", "key": "nats-password"},
        "SECRET_REDIS_PASSWORD": {"name": "cdc-credentials", "key": "redis-password"},
    }
    # No .secrets.toml: neither in the volume nor among the settings files.
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    assert [list(src) for src in volume["projected"]["sources"]] == [["configMap"]]
    assert env(docs)["SETTINGS_FILES_FOR_DYNACONF"] == f"{CONFIG_DIR}/settings.toml"
    assert "Secret" not in {d["kind"] for d in docs} and "checksum/secret" not in pod_annotations(docs)

    (tmp_path / "settings.toml").write_text(only(docs, "ConfigMap")["data"]["settings.toml"])
    secret_values = {"SECRET_NATS_PASSWORD": password, "SECRET_REDIS_PASSWORD": "r" + password}
    for name, value in env(docs).items():
        monkeypatch.setenv(name, _expand(value.replace(CONFIG_DIR, str(tmp_path)), secret_values))
    loaded = config.load_settings()
    assert loaded.nats.password == password
    assert loaded.redis.password == "r" + password


def test_per_key_secret_needs_the_secret_name(tmp_path: Path) -> None:
    _fails({"secrets": {"existingSecretKeys": {"nats": {"password": "k"}}}}, tmp_path, "needs secrets.existingSecret")


CREDENTIALS = {"secrets": {"redis": {"password": "hunter2"}}}


def test_secret_checksum_is_salted(tmp_path: Path) -> None:
    def annotation(salt: str, password: str = "hunter2") -> str:
        values = {"secrets": {"redis": {"password": password}, "checksumSalt": salt}}
        return pod_annotations(render(values, tmp=tmp_path))["checksum/secret"]

    salted = annotation("pepper-1")
    assert re.fullmatch(r"[0-9a-f]{64}", salted)
    assert annotation("pepper-1") == salted  # stable for a given salt (GitOps renders)
    assert annotation("pepper-2") != salted  # the salt is an input the pod's readers do not know
    assert annotation("pepper-1", "hunter3") != salted  # and the secret still rolls the pods

    docs = render({**CREDENTIALS, "secrets": {**CREDENTIALS["secrets"], "checksumSalt": "pepper-1"}}, tmp=tmp_path)
    assert only(docs, "Secret")["stringData"]["checksum-salt"] == "pepper-1"  # kept for upgrades
    assert "pepper-1" not in json.dumps(only(docs, "Deployment"))
    # The salt is never mounted: only .secrets.toml is projected.
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "config"]
    assert volume["projected"]["sources"][1]["secret"]["items"] == [{"key": ".secrets.toml", "path": ".secrets.toml"}]


def test_secret_checksum_without_a_salt_value_is_random_offline(tmp_path: Path) -> None:
    """No salt value and no cluster to look the stored one up: a new random salt, consistent within the render."""
    first, second = (render(CREDENTIALS, tmp=tmp_path) for _ in range(2))
    assert pod_annotations(first)["checksum/secret"] != pod_annotations(second)["checksum/secret"]
    salts = [only(d, "Secret")["stringData"]["checksum-salt"] for d in (first, second)]
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", s) for s in salts) and salts[0] != salts[1]
    # One salt per render: the Secret stores the one the annotation used (an upgrade that finds it gets the same).
    again = render({"secrets": {**CREDENTIALS["secrets"], "checksumSalt": salts[0]}}, tmp=tmp_path)
    assert pod_annotations(again)["checksum/secret"] == pod_annotations(first)["checksum/secret"]


def test_no_salt_when_the_secret_holds_no_credential(default_docs: list[dict[str, Any]]) -> None:
    assert "checksum-salt" not in only(default_docs, "Secret")["stringData"]


# --- helm test, NetworkPolicy


def test_helm_test_pod_calls_readyz_through_the_service(default_docs: list[dict[str, Any]]) -> None:
    (pod,) = hooks(default_docs)
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = only(default_docs, "Service")
    # The Service must not select the test pod.
    assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert c["args"] == [f"http://{NAME}.cdc.svc:8080/readyz"]
    assert c["image"] == container(default_docs)["image"]
    assert c["securityContext"] == container(default_docs)["securityContext"]
    assert c["resources"]["limits"]
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["automountServiceAccountToken"] is False


def test_helm_test_script_fails_on_a_non_ready_answer(default_docs: list[dict[str, Any]]) -> None:
    """The test pod's script, run here against a local server: exit 0 on 200, non-zero on 503."""
    import http.server
    import threading

    (pod,) = hooks(default_docs)
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"])
            self.end_headers()
            self.wfile.write(b'{"status": "x"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/readyz"
        ok = subprocess.run([sys.executable, "-c", command[2], url], capture_output=True, timeout=30, check=False)
        assert ok.returncode == 0, ok.stderr
        status["code"] = 503
        bad = subprocess.run([sys.executable, "-c", command[2], url], capture_output=True, timeout=30, check=False)
        assert bad.returncode != 0
    finally:
        server.shutdown()
        server.server_close()


def test_helm_test_can_be_turned_off(tmp_path: Path) -> None:
    assert not hooks(render({"tests": {"enabled": False}}, tmp=tmp_path))


def test_network_policy_is_off_by_default(default_docs: list[dict[str, Any]]) -> None:
    assert "NetworkPolicy" not in {d["kind"] for d in default_docs}


def test_network_policy() -> None:
    docs = render(None, CHART / "ci" / "keda-values.yaml")
    policy = only(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": only(docs, "Deployment")["spec"]["selector"]["matchLabels"]}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert monitoring in ingress["from"]
    (test_pod,) = hooks(docs)
    assert any(
        peer.get("podSelector", {}).get("matchLabels", {}).items() <= test_pod["metadata"]["labels"].items()
        and "podSelector" in peer
        for peer in ingress["from"]
    )
    nats, redis, dns = policy["egress"]
    # The ports come from the effective URLs (nats://nats.nats:4222,nats://nats-1.nats:4223; redis ...:6380).
    assert nats["ports"] == [{"port": 4222, "protocol": "TCP"}, {"port": 4223, "protocol": "TCP"}]
    assert nats["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nats"}}}]
    assert redis["ports"] == [{"port": 6380, "protocol": "TCP"}]
    assert {p["port"] for p in dns["ports"]} == {53}


def test_network_policy_default_ports(tmp_path: Path) -> None:
    values = {
        "networkPolicy": {"enabled": True},
        "settings": {"nats": {"url": ["nats://a", "tls://b:7422"]}, "redis": {"url": "rediss://r.cache/0"}},
    }
    nats, redis, _ = only(render(values, tmp=tmp_path), "NetworkPolicy")["spec"]["egress"]
    assert [p["port"] for p in nats["ports"]] == [4222, 7422]
    assert [p["port"] for p in redis["ports"]] == [6379]
    assert "to" not in nats  # any destination on those ports


# --- KEDA


def test_keda_is_off_by_default(default_docs: list[dict[str, Any]]) -> None:
    assert "ScaledObject" not in {d["kind"] for d in default_docs}


def test_keda_scaled_object() -> None:
    docs = render(None, CHART / "ci" / "keda-values.yaml")
    assert "replicas" not in only(docs, "Deployment")["spec"]
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in docs}  # KEDA makes its own
    scaled = only(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 8)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 600
    }
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    # Stream and durable follow the effective ingest settings.
    assert trigger["metadata"] == {
        "natsServerMonitoringEndpoint": "nats.nats.svc.cluster.local:8222",
        "account": "$G",
        "stream": "cdc_in",
        "consumer": "cdc_workers",
        "lagThreshold": "5000",
        "useHttps": "false",
    }


def test_keda_defaults_follow_the_default_settings(tmp_path: Path) -> None:
    values = {"keda": {"enabled": True, "natsServerMonitoringEndpoint": "nats.nats:8222"}}
    trigger = only(render(values, tmp=tmp_path), "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert (trigger["stream"], trigger["consumer"]) == ("cdc_events_stream", "cdc_consumers")
    assert trigger["lagThreshold"] == "10000"


def test_keda_in_partitioned_mode_scales_on_the_partition_durables() -> None:
    """The shared durable is unused in partitioned mode: one trigger per partition durable, their sum is the lag."""
    spec = only(render(None, CHART / "ci" / "keda-partitioned-values.yaml"), "ScaledObject")["spec"]
    assert [(t["name"], t["metadata"]["stream"], t["metadata"]["consumer"]) for t in spec["triggers"]] == [
        (f"p{p}", "cdc_in_partitioned", f"cdc_workers_p{p}") for p in range(4)
    ]
    assert spec["advanced"]["scalingModifiers"] == {
        "formula": "p0 + p1 + p2 + p3",
        "target": "5000",
        "metricType": "AverageValue",
    }
    assert spec["maxReplicaCount"] == 4


def test_keda_in_partitioned_mode_follows_the_default_partition_settings(tmp_path: Path) -> None:
    values = {
        "keda": {"enabled": True, "natsServerMonitoringEndpoint": "n:8222", "maxReplicas": 8},
        "settings": {"ingest": {"ordering": "partitioned"}},
    }
    triggers = only(render(values, tmp=tmp_path), "ScaledObject")["spec"]["triggers"]
    assert {t["metadata"]["stream"] for t in triggers} == {"cdc_events_partitioned"}
    assert [t["metadata"]["consumer"] for t in triggers] == [f"cdc_consumers_p{p}" for p in range(8)]


def test_keda_in_partitioned_mode_refuses_more_replicas_than_partitions(tmp_path: Path) -> None:
    values = {
        "keda": {"enabled": True, "natsServerMonitoringEndpoint": "n:8222", "maxReplicas": 5},
        "settings": {"ingest": {"ordering": "partitioned", "partitions": 4}},
    }
    _fails(values, tmp_path, "keda.maxReplicas (5) must not exceed ingest.partitions (4)")


def test_keda_needs_the_monitoring_endpoint(tmp_path: Path) -> None:
    _fails({"keda": {"enabled": True}}, tmp_path, "keda.natsServerMonitoringEndpoint is required")


def test_keda_never_scales_to_zero(tmp_path: Path) -> None:
    _fails(
        {"keda": {"enabled": True, "natsServerMonitoringEndpoint": "n:8222", "minReplicas": 0}}, tmp_path, "minReplicas"
    )


# --- Alert rules as the chart renders them

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")


def _rules(values: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    docs = render({"prometheusRule": {"enabled": True, **values}}, tmp=tmp)
    spec = only(docs, "PrometheusRule")["spec"]
    return [rule for group in spec["groups"] for rule in group["rules"]]


def test_runbook_urls_are_relative_by_default_and_absolute_on_request(tmp_path: Path) -> None:
    for rule in _rules({}, tmp_path):
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{rule['alert'].lower()}"
    base = "https://git.example.com/cdc_service/blob/main"
    for rule in _rules({"runbookBaseUrl": base}, tmp_path):
        assert rule["annotations"]["runbook_url"] == f"{base}/docs/operations.md#{rule['alert'].lower()}"


def test_service_gone_alerts_select_the_release(tmp_path: Path) -> None:
    rules = {(r["alert"], r["labels"]["severity"]): r for r in _rules({}, tmp_path)}
    down = rules[("CdcConsumerDown", "critical")]["expr"]
    assert f'absent(up{{job="{NAME}", namespace="cdc"}})' in down
    assert 'job="cdc-service"' not in json.dumps(list(rules.values()))
    custom = {r["alert"]: r for r in _rules({"job": "my-scrape-job"}, tmp_path)}
    assert 'up{job="my-scrape-job", namespace="cdc"} == 0' in custom["CdcConsumerTargetDown"]["expr"]


def test_lag_thresholds_come_from_values(tmp_path: Path) -> None:
    lag = {"warningSeconds": 2.5, "criticalSeconds": 12, "minEventsPerSecond": 0.2}
    rules = [r for r in _rules({"lag": lag}, tmp_path) if r["alert"] == "CdcConsumerLagHigh"]
    by_severity = {r["labels"]["severity"]: r["expr"] for r in rules}
    assert "[2m]))) > 2.5\n" in by_severity["warning"]
    assert "[2m]))) > 12\n" in by_severity["critical"]
    assert all("rate(cdc_consumer_lag_seconds_count[2m])) >= 0.2" in e for e in by_severity.values())


@needs_promtool
def test_rendered_rules_pass_promtool_and_fire_on_the_chart_thresholds(tmp_path: Path) -> None:
    """The rendered PrometheusRule, with non-default thresholds, checked and unit-tested by promtool. At 0.5
    events/s with a p95 of 9.75 s, both levels fire at 2.5 s / 8 s with a 0.2/s guard (the file's own numbers, 3 s,
    30 s and 1/s, would fire neither), and the absent() rule fires for this release's job and namespace."""
    lag = {"warningSeconds": 2.5, "criticalSeconds": 8, "minEventsPerSecond": 0.2}
    docs = render({"prometheusRule": {"enabled": True, "lag": lag}}, tmp=tmp_path)
    rules_file = tmp_path / "rendered-rules.yaml"
    rules_file.write_text(yaml.safe_dump(only(docs, "PrometheusRule")["spec"]))
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    bucket = 'cdc_consumer_lag_seconds_bucket{namespace="cdc",job="%s",le="%s"}'
    unit = {
        "rule_files": [rules_file.name],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    # 0.5 events/s, p95 9.75 s: above both thresholds and the rate guard
                    {"series": bucket % (NAME, "5"), "values": "0x40"},
                    {"series": bucket % (NAME, "10"), "values": "0+7.5x40"},
                    {"series": bucket % (NAME, "+Inf"), "values": "0+7.5x40"},
                    {"series": f'cdc_consumer_lag_seconds_count{{namespace="cdc",job="{NAME}"}}', "values": "0+7.5x40"},
                    {"series": 'up{namespace="other",job="x"}', "values": "1x40"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "CdcConsumerLagHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": severity, "namespace": "cdc", "job": NAME},
                                "exp_annotations": {
                                    "summary": f"CDC events reach wa_stream {late}: lag p95 9.75s",
                                    "description": "The 95th percentile of the time from the source commit to the "
                                    f"publish of the enriched event has been 9.75s (above the {severity} threshold) "
                                    f"for 2 minutes in job {NAME} (namespace cdc).",
                                    "runbook_url": "docs/operations.md#cdcconsumerlaghigh",
                                },
                            }
                            for severity, late in (("warning", "late"), ("critical", "very late"))
                        ],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "CdcConsumerDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "namespace": "cdc", "job": NAME},
                                "exp_annotations": {
                                    "summary": f"No CDC replica is running ({NAME})",
                                    "description": f"No replica of job {NAME} (namespace cdc) has been scraped "
                                    "successfully for 5 minutes: CDC events are not being delivered to wa_stream.",
                                    "runbook_url": "docs/operations.md#cdcconsumerdown",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    unit_file = tmp_path / "rendered-rules-test.yaml"
    unit_file.write_text(yaml.safe_dump(unit))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(unit_file)], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Documentation


def _leaf_paths(schema: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, sub in schema.get("properties", {}).items():
        if key == "global":
            continue
        # `settings` is one row: its keys are the service's settings, documented in docs/system_architecture.md.
        if "properties" in sub and key != "settings":
            paths += _leaf_paths(sub, f"{prefix}{key}.")
        else:
            paths.append(prefix + key)
    return paths


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = [p for p in _leaf_paths(schema) if f"| `{p}` |" not in readme]
    assert not missing, f"values missing from the README's table: {missing}"

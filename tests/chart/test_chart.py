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
K8S_VERSION = "1.30"
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
    args = [arg for f in files for arg in ("-f", str(f))]
    if values is not None:
        assert tmp is not None
        path = tmp / f"values-{len(list(tmp.glob('values-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    return args


def template(
    values: dict[str, Any] | None = None, *files: Path, tmp: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return helm("template", RELEASE, str(CHART), "--namespace", "cdc", *_values_args(values, files, tmp))


def render(values: dict[str, Any] | None = None, *files: Path, tmp: Path | None = None) -> list[dict[str, Any]]:
    result = template(values, *files, tmp=tmp)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


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
    result = helm("lint", "--strict", str(CHART), *(["-f", str(values_file)] if values_file else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


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


# The CRD kinds have no schema in kubernetes-validate; they get a small structural check instead.
CRD_CHECKS = {"ServiceMonitor": _check_servicemonitor, "PrometheusRule": _check_prometheusrule}


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=_ids)
def test_rendered_manifests_validate_against_kubernetes_schemas(values_file: Path | None) -> None:
    docs = render(None, *([values_file] if values_file else []))
    assert {"Deployment", "ConfigMap", "Service"} <= {d["kind"] for d in docs}
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "cdc-service" and labels["app.kubernetes.io/instance"] == RELEASE
        if doc["kind"] in CRD_CHECKS:
            CRD_CHECKS[doc["kind"]](doc)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
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
    kinds = sorted(d["kind"] for d in default_docs)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"]
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
        "SETTINGS_FILES_FOR_DYNACONF": f"{CONFIG_DIR}/settings.toml,{CONFIG_DIR}/.secrets.toml"
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
    "publish.stream": "wa_out",
    "publish.subjects": ["wa.>", "wb.>"],
    "dedup.key_prefix": "dd:",
    "redis.url": "rediss://redis:6380/0",
    "redis.tls_ca_file": "/etc/redis/ca.pem",
    "redis.mode": "cluster",
    "dlq.stream": "dlq_out",
    "dlq.subject_prefix": "dead",
    "http.host": "127.0.0.1",
    "log.level": "DEBUG",
}
ROUTES = {
    "messages": {"subject": "wa.{company}.{agent_id}.msg.{chat_id}"},
    "chats": False,
    "contacts": {"pk": "contact_id", "subject": "wa.{company}.contacts"},
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

    files = {
        "settings.toml": only(docs, "ConfigMap")["data"]["settings.toml"],
        ".secrets.toml": only(docs, "Secret")["stringData"][".secrets.toml"],
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name, value in env(docs).items():
        monkeypatch.setenv(name, value.replace(CONFIG_DIR, str(tmp_path)))
    loaded = config.load_settings()

    for key, value in expected.items():
        section, name = key.split(".")
        assert getattr(getattr(loaded, section), name) == value, key
    assert loaded.nats.password == SECRETS["nats"]["password"]
    assert loaded.nats.token == "tok"
    assert loaded.redis.password == "rp"
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
    ],
    ids=["typo", "secret-in-settings", "enum", "minimum", "bad-toml", "unknown-value"],
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
        {"settings": {"shutdown": {"grace_seconds": 30}}},
        {"settingsToml": "[shutdown]\ngrace_seconds = 45.0\n"},
    ],
    ids=["equal", "lower", "grace-via-settings", "grace-via-settingsToml"],
)
def test_render_fails_when_termination_grace_is_too_short(values: dict[str, Any], tmp_path: Path) -> None:
    result = template(values, tmp=tmp_path)
    assert result.returncode != 0
    assert "terminationGracePeriodSeconds" in result.stderr and "must be greater than" in result.stderr


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
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())

    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert len(dashboards) == 1
    dashboard = dashboards[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "CDC"}
    (body,) = dashboard["data"].values()
    assert json.loads(body) == json.loads((CHART / "files" / "dashboard.json").read_text())


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

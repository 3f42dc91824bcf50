"""The files in docs/deploy/ stay valid: the systemd units verify (sidecast.service, and sidecast@.service as an instance), the Kubernetes manifests
parse with the fields Kubernetes requires and agree with each other, and the config they
carry is one sidecast accepts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "docs" / "deploy"
BIN = os.environ.get("SIDECAST_BIN", str(ROOT / "target" / "debug" / "sidecast"))


@pytest.mark.parametrize(
    "unit_file, verified_as",
    [("sidecast.service", "sidecast.service"), ("sidecast@.service", "sidecast@0.service")],
)
def test_the_systemd_units_verify_without_a_warning(unit_file, verified_as):
    assert shutil.which("systemd-analyze"), "systemd-analyze is needed (apt-get install systemd)"
    unit = (DEPLOY / unit_file).read_text()
    # verify checks that ExecStart exists: point it at the binary cargo built. The template
    # is verified as its instance 0 (core 0).
    unit = unit.replace("/usr/local/bin/sidecast", BIN)
    with tempfile.TemporaryDirectory() as dir_:
        path = Path(dir_) / verified_as
        path.write_text(unit)
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(path)],
            capture_output=True, text=True,
        )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"warnings: {result.stderr}"


def manifests():
    return list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))


def test_every_manifest_has_the_fields_kubernetes_requires():
    docs = manifests()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Secret", "Deployment", "Service"}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def test_the_pod_the_service_and_the_config_agree():
    docs = {d["kind"]: d for d in manifests()}
    deployment, service = docs["Deployment"], docs["Service"]
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    pod = spec["template"]["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"worker", "sidecast"}
    for container in containers.values():
        assert container["image"]
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, mount
    sidecast = containers["sidecast"]
    ports = {p["name"]: p["containerPort"] for p in sidecast["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = sidecast[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ports
    assert sidecast["lifecycle"]["preStop"]
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
    # Both containers mount the socket's emptyDir at the same place the config names.
    socket_dir = {
        c["name"]: next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "sidecast-socket")
        for c in containers.values()
    }
    assert socket_dir["worker"] == socket_dir["sidecast"]
    toml = docs["ConfigMap"]["data"]["sidecast.toml"]
    assert f'publish_socket = "{socket_dir["sidecast"]}/sidecast.sock"' in toml
    worker_env = {e["name"]: e.get("value") for e in containers["worker"]["env"]}
    assert worker_env["SIDECAST_SOCKET"] == f'{socket_dir["worker"]}/sidecast.sock'
    # The grace period covers the preStop pause and sidecast's own shutdown_timeout.
    timeout = int(re.search(r'shutdown_timeout = "(\d+)s"', toml).group(1))
    pause = sidecast["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > timeout + pause


def test_the_config_in_the_configmap_is_one_sidecast_accepts():
    toml = {d["kind"]: d for d in manifests()}["ConfigMap"]["data"]["sidecast.toml"]
    with tempfile.TemporaryDirectory() as dir_:
        path = Path(dir_) / "sidecast.toml"
        path.write_text(toml)
        result = subprocess.run([BIN, "config", "--check", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_containerfile_copies_what_the_repository_has():
    text = (DEPLOY / "Containerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), item
    assert 'ENTRYPOINT ["/usr/local/bin/sidecast"]' in text

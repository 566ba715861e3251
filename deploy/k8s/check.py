#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/k8s without a cluster.

    py=$(tests/python/setup.sh | tail -1)
    "$py" deploy/k8s/check.py --bin-dir "$CARGO_TARGET_DIR/debug"   # `make manifests` does this

1. Every manifest validates, strictly (no unknown field), against the Kubernetes API schemas of
   the oldest and the newest version we support (kubernetes-validate bundles them).
2. The manifests agree with each other and with the services: one ConfigMap, Deployment,
   PodDisruptionBudget and Service per binary under services/; selectors that select; probes on
   the admin port the service's config listens on; a termination grace longer than the
   service's shutdown grace; non-root, read-only, no capabilities, resources set.
3. Each ConfigMap's TOML, with the environment the Deployment gives it, passes the service's own
   `--check-config` (unknown keys and bad values are refused there).

`--self-test` breaks a copy of the manifests in several ways and fails unless each break is
reported: the checks above can fail.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The oldest Kubernetes minor we support, and the newest the schemas know.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Secrets the operator creates (README.md); the manifests only refer to them.
EXTERNAL_SECRETS = {"tributary-kafka-credentials", "usage-ingest-api-keys", "erp-poster-tryton"}
CONNECTION = "tributary-connection"


def load(directory: Path) -> tuple[dict, dict[str, list[dict]]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents = {}
    for path in sorted(directory.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return kustomization, documents


def services() -> list[str]:
    return sorted(p.name for p in (ROOT / "services").iterdir() if (p / "Cargo.toml").exists())


def find(documents: dict[str, list[dict]], kind: str, name: str) -> dict | None:
    for docs in documents.values():
        for doc in docs:
            if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == name:
                return doc
    return None


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def check_schemas(documents: dict[str, list[dict]], errors: list[str]) -> None:
    for file, docs in documents.items():
        for doc in docs:
            what = f"{file}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as error:
                    path = ".".join(str(p) for p in error.path)
                    errors.append(f"{what}: not valid for Kubernetes {version} at `{path}`: {error.message}")


def check_kustomization(kustomization: dict, documents: dict[str, list[dict]], errors: list[str]) -> None:
    listed = set(kustomization.get("resources", []))
    for file in sorted(set(documents) - listed):
        errors.append(f"kustomization.yaml: {file} is not in resources, so `kubectl apply -k` skips it")
    for file in sorted(listed - set(documents)):
        errors.append(f"kustomization.yaml: resource {file} does not exist")


def check_service(name: str, documents: dict[str, list[dict]], bin_dir: Path | None, errors: list[str]) -> None:
    def fail(message: str) -> None:
        errors.append(f"{name}: {message}")

    config_map = find(documents, "ConfigMap", f"{name}-config")
    deployment = find(documents, "Deployment", name)
    budget = find(documents, "PodDisruptionBudget", name)
    service = find(documents, "Service", name)
    for kind, doc in [("ConfigMap", config_map), ("Deployment", deployment), ("PodDisruptionBudget", budget),
                      ("Service", service)]:
        if doc is None:
            fail(f"no {kind}")
    if config_map is None or deployment is None:
        return
    toml_key = f"{name}.toml"
    config_text = config_map.get("data", {}).get(toml_key)
    if config_text is None:
        fail(f"ConfigMap {name}-config has no key {toml_key}")
        return
    config = parse_toml(config_text, fail)

    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels", {})
    selector = spec["selector"].get("matchLabels", {})
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        fail("the Deployment's selector does not match its pod labels")
    if budget is not None and budget["spec"]["selector"].get("matchLabels") != selector:
        fail("the PodDisruptionBudget does not select the Deployment's pods")
    if service is not None and any(labels.get(k) != v for k, v in service["spec"].get("selector", {}).items()):
        fail("the Service does not select the Deployment's pods")

    containers = [c for c in pod["containers"] if c["name"] == name]
    if len(containers) != 1:
        fail(f"the Deployment has no container named {name}")
        return
    container = containers[0]
    command = container.get("command", [])
    if command[:1] != [f"/usr/local/bin/{name}"]:
        fail(f"the container runs {command[:1]}, not /usr/local/bin/{name}")

    # The config file the command names is the ConfigMap's key, mounted.
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_path = command[command.index("--config") + 1] if "--config" in command else None
    config_mount = next(
        (m for path, m in mounts.items() if config_path and config_path == f"{path}/{toml_key}"), None
    )
    if config_mount is None or volumes.get(config_mount["name"], {}).get("configMap", {}).get("name") != f"{name}-config":
        fail(f"--config {config_path} is not the ConfigMap {name}-config mounted with key {toml_key}")
    for mount in mounts.values():
        if mount["name"] not in volumes:
            fail(f"volume mount {mount['mountPath']} names no volume")
    for volume in volumes.values():
        if "configMap" in volume and find(documents, "ConfigMap", volume["configMap"]["name"]) is None:
            fail(f"volume {volume['name']} mounts ConfigMap {volume['configMap']['name']}, which no manifest defines")
        if "secret" in volume and volume["secret"]["secretName"] not in EXTERNAL_SECRETS:
            fail(f"volume {volume['name']} mounts Secret {volume['secret']['secretName']}, not one README.md lists")

    # The admin port: the config's listen address, the container port, the probes, the scrape.
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    admin_listen = config.get("admin", {}).get("listen")
    if admin_listen is None or not admin_listen.startswith("0.0.0.0:"):
        fail("[admin] listen must be 0.0.0.0:<port>, or the kubelet cannot reach the probes")
    elif ports.get("admin") != port_of(admin_listen):
        fail(f"container port `admin` is {ports.get('admin')} but the service listens on {admin_listen}")
    for probe, path in [("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready"),
                        ("startupProbe", "/health/live")]:
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("admin", ports.get("admin")):
            fail(f"{probe} must GET {path} on the admin port")
    annotations = spec["template"]["metadata"].get("annotations", {})
    if admin_listen and annotations.get("prometheus.io/port") != str(port_of(admin_listen)):
        fail("the prometheus.io/port annotation is not the admin port")
    http_listen = config.get(name.replace("-", "_"), {}).get("http", {}).get("listen")
    if http_listen is not None and ports.get("http") != port_of(http_listen):
        fail(f"container port `http` is {ports.get('http')} but the HTTP API listens on {http_listen}")

    # Hardening and sizing.
    security = container.get("securityContext", {})
    if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
        fail("the pod must run as non-root (securityContext.runAsNonRoot)")
    if security.get("readOnlyRootFilesystem") is not True:
        fail("the container's root file system must be read-only")
    if security.get("allowPrivilegeEscalation") is not False:
        fail("the container must not allow privilege escalation")
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        fail("the container must drop all capabilities")
    resources = container.get("resources", {})
    if not {"cpu", "memory"} <= set(resources.get("requests", {})) or "memory" not in resources.get("limits", {}):
        fail("the container needs cpu and memory requests and a memory limit")

    # The environment: the shared connection, the pod name as instance id.
    env_from = [e.get("configMapRef", {}).get("name") for e in container.get("envFrom", [])]
    if CONNECTION not in env_from:
        fail(f"the container does not read the {CONNECTION} ConfigMap")
    env = {e["name"]: e for e in container.get("env", [])}
    instance = env.get("TRIBUTARY__RUNTIME__INSTANCE_ID", {}).get("valueFrom", {}).get("fieldRef", {})
    if instance.get("fieldPath") != "metadata.name":
        fail("TRIBUTARY__RUNTIME__INSTANCE_ID must be the pod name (a stable transactional id per pod)")

    if bin_dir is not None:
        checked = check_config(name, config_text, container, mounts, volumes, documents, bin_dir, fail)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if checked is not None and grace <= checked["shutdown_grace"]:
            fail(f"terminationGracePeriodSeconds {grace} must exceed runtime.shutdown_grace "
                 f"({checked['shutdown_grace']:g} s), or the kubelet kills the process mid-commit")


def parse_toml(text: str, fail) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        fail(f"the ConfigMap's TOML does not parse: {error}")
        return {}


def check_config(name, config_text, container, mounts, volumes, documents, bin_dir, fail) -> dict | None:
    """Runs `<service> --check-config` on the ConfigMap's TOML with the Deployment's environment.
    Files the TOML reads from mounted Secrets are stood in for by sample files."""
    binary = bin_dir / name
    if not binary.exists():
        fail(f"{binary} does not exist: build the workspace first (`make build`)")
        return None
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    connection = find(documents, "ConfigMap", CONNECTION)
    env.update((connection or {}).get("data", {}))
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "pod-0")
    with tempfile.TemporaryDirectory() as scratch:
        text = config_text
        for path, mount in mounts.items():
            if "secret" not in volumes.get(mount["name"], {}):
                continue
            stand_in = Path(scratch) / mount["name"]
            stand_in.mkdir()
            for file in re.findall(re.escape(path) + r"/([\w.-]+)", config_text):
                (stand_in / file).write_text("a-sample-key-of-enough-length\n")
            text = text.replace(path, str(stand_in))
        config_file = Path(scratch) / f"{name}.toml"
        config_file.write_text(text)
        result = subprocess.run([str(binary), "--config", str(config_file), "--check-config"],
                                env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        fail("the ConfigMap's configuration is refused by the service:\n" + (result.stderr or result.stdout).strip())
        return None
    grace = re.search(r"shutdown_grace: (\d+(?:\.\d+)?)s", result.stdout)
    return {"shutdown_grace": float(grace.group(1)) if grace else 0.0}


def check(directory: Path, bin_dir: Path | None) -> list[str]:
    errors: list[str] = []
    kustomization, documents = load(directory)
    check_kustomization(kustomization, documents, errors)
    check_schemas(documents, errors)
    if find(documents, "ConfigMap", CONNECTION) is None:
        errors.append(f"no ConfigMap {CONNECTION}")
    for name in services():
        check_service(name, documents, bin_dir, errors)
    return errors


def self_test(bin_dir: Path | None) -> list[str]:
    """Each break must be reported by `check`, with the words given."""

    def deployment(docs):
        return next(d for d in docs["usage-ingest.yaml"] if d["kind"] == "Deployment")

    def container(docs):
        return deployment(docs)["spec"]["template"]["spec"]["containers"][0]

    def config_map(docs):
        return next(d for d in docs["usage-ingest.yaml"] if d["kind"] == "ConfigMap")

    def misspell_probe(docs):
        container(docs)["readinessprobe"] = container(docs).pop("readinessProbe")

    def writable_root(docs):
        container(docs)["securityContext"]["readOnlyRootFilesystem"] = False

    def admin_port_moved(docs):
        data = config_map(docs)["data"]
        data["usage-ingest.toml"] = data["usage-ingest.toml"].replace('"0.0.0.0:9100"', '"0.0.0.0:9200"')

    def unknown_setting(docs):
        data = config_map(docs)["data"]
        data["usage-ingest.toml"] = data["usage-ingest.toml"].replace("hour_grace", "hour_graze")

    def short_grace(docs):
        deployment(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 5

    def budget_elsewhere(docs):
        budget = next(d for d in docs["usage-ingest.yaml"] if d["kind"] == "PodDisruptionBudget")
        budget["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "nothing"}

    def service_missing(docs):
        docs["erp-poster.yaml"] = [d for d in docs["erp-poster.yaml"] if d["kind"] != "Service"]

    breaks = [
        (misspell_probe, "readinessprobe"),
        (writable_root, "read-only"),
        (admin_port_moved, "listens on 0.0.0.0:9200"),
        (short_grace, "terminationGracePeriodSeconds 5"),
        (budget_elsewhere, "PodDisruptionBudget does not select"),
        (service_missing, "erp-poster: no Service"),
    ]
    if bin_dir is not None:
        breaks.append((unknown_setting, "hour_graze"))
    failures = []
    _, original = load(HERE)
    for breaking, words in breaks:
        documents = copy.deepcopy(original)
        breaking(documents)
        with tempfile.TemporaryDirectory() as scratch:
            directory = Path(scratch)
            (directory / "kustomization.yaml").write_text((HERE / "kustomization.yaml").read_text())
            for file, docs in documents.items():
                (directory / file).write_text(yaml.safe_dump_all(docs, sort_keys=False))
            errors = check(directory, bin_dir)
        if not any(words in error for error in errors):
            failures.append(f"self-test: breaking with {breaking.__name__} was not reported "
                            f"(expected “{words}”; got {errors or 'no error'})")
        else:
            print(f"self-test: {breaking.__name__} is reported", file=sys.stderr)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", type=Path, help="where the service binaries are (runs --check-config)")
    parser.add_argument("--self-test", action="store_true", help="also check that breaks are reported")
    args = parser.parse_args()
    errors = check(HERE, args.bin_dir)
    if args.self_test:
        errors += self_test(args.bin_dir)
    for error in errors:
        print(f"deploy/k8s: {error}", file=sys.stderr)
    if errors:
        return 1
    names = ", ".join(services())
    print(f"deploy/k8s: manifests valid for Kubernetes {' and '.join(KUBERNETES_VERSIONS)}; "
          f"consistent for {names}" + ("; configs accepted by the services" if args.bin_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

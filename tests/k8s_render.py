"""deploy/k8s rendered as kustomize renders it, and read the way the tests need it.

``render`` uses ``kubectl kustomize`` (or ``kustomize build``) where one is installed, else
``render_in_python``, which reads the few kustomize features the base uses and refuses any
other (tests/integration/test_k8s_manifests.py checks the two agree where both exist). Generated
names are given without kustomize's hash suffix. Nothing here needs a cluster or the network.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import yaml

from cli.topology import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator"}


def render() -> list[dict]:
    return render_with_kustomize() if kustomize_command() else render_in_python()


def render_in_python(root: Path = K8S_DIR) -> list[dict]:
    """The base as kustomize renders it, generated names without their hash suffix."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KUSTOMIZE_KEYS
    if unknown:
        raise ValueError(f"render_in_python does not know {sorted(unknown)}: teach it, or install kubectl")
    objects = [doc for resource in kustomization["resources"]
               for doc in yaml.safe_load_all((root / resource).read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        if set(generator) != {"name", "files"}:
            raise ValueError(f"render_in_python reads only name and files of a generator: {generator}")
        data = {}
        for source in generator["files"]:
            key, _, path = source.rpartition("=")
            data[key or PurePosixPath(path).name] = (root / path).read_text()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                        "data": data})
    for obj in objects:
        if obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for container in (c for obj in objects for c in containers_of(obj)):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return objects


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(K8S_DIR)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(K8S_DIR)]
    return None


def render_with_kustomize() -> list[dict]:
    """kustomize's own rendering, generated names without their hash suffix."""
    done = subprocess.run(kustomize_command(), capture_output=True, text=True, timeout=60, check=True)
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    text = done.stdout
    for generator in kustomization.get("configMapGenerator", []):
        text = re.sub(rf"\b{re.escape(generator['name'])}-[a-z0-9]{{10}}\b", generator["name"], text)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def containers_of(obj: dict) -> list[dict]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", [])


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} in deploy/k8s"
    return matches[0]


def workload(objects: list[dict], name: str) -> dict:
    return find(objects, "StatefulSet" if name == "redis" else "Deployment", name)


def container(objects: list[dict], name: str) -> dict:
    (only,) = containers_of(workload(objects, name))
    return only


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def mounts(objects: list[dict], name: str) -> dict[str, dict]:
    """mountPath -> the volume mounted there."""
    pod = workload(objects, name)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container(objects, name).get("volumeMounts", [])}


def kubelet_layout(root: Path, data: dict[str, str], items: list[dict] | None) -> Path:
    """A ConfigMap volume as the kubelet writes it: files in ..<timestamp>/, ..data linking
    to it, and each top-level name a link through ..data."""
    paths = {i["key"]: i["path"] for i in items} if items is not None else {k: k for k in data}
    assert set(paths) <= set(data), f"items name keys the ConfigMap lacks: {set(paths) - set(data)}"
    stamp = root / "..2026_01_01_00_00_00.000000000"
    for key, path in paths.items():
        (stamp / path).parent.mkdir(parents=True, exist_ok=True)
        (stamp / path).write_text(data[key])
    os.symlink(stamp.name, root / "..data")
    for top in {PurePosixPath(p).parts[0] for p in paths.values()}:
        os.symlink(f"..data/{top}", root / top)
    return root

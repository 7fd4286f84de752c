"""What the base manifests say about the app image: which containers run it, with which
command."""

from __future__ import annotations

from tools.deploy.layout import APP_IMAGE
from tools.deploy.render import Manifest


def argv(container: Manifest) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def app_containers(manifests: list[Manifest]) -> list[tuple[str, Manifest, Manifest]]:
    """(workload name, pod spec, container) for every container that runs the app image."""
    found = []
    for doc in manifests:
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod is None:
            continue
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            if container["image"].split(":")[0] == APP_IMAGE:
                found.append((doc["metadata"]["name"], pod, container))
    return found


def service_commands(manifests: list[Manifest]) -> dict[str, list[str]]:
    """Each Deployment's command by the service it runs (`python -m services.<name>`)."""
    commands = {}
    for doc in manifests:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if container["image"].split(":")[0] == APP_IMAGE:
                command = argv(container)
                commands[command[2].removeprefix("services.")] = command
    return commands


def migration_commands(manifests: list[Manifest]) -> list[list[str]]:
    [job] = [d for d in manifests if d["kind"] == "Job" and "migrate" in d["metadata"]["name"]]
    return [argv(container) for container in job["spec"]["template"]["spec"]["containers"]]


def writable_mounts(manifests: list[Manifest]) -> list[str]:
    """The paths mounted writable into any container of the app image (the root filesystem is
    read-only)."""
    return sorted(
        {
            mount["mountPath"]
            for _, _, container in app_containers(manifests)
            for mount in container.get("volumeMounts", [])
            if not mount.get("readOnly", False)
        }
    )

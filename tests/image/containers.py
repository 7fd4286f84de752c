"""Processes run from the built image with buildah, which needs no daemon: each in its own
working container (`buildah run --isolation chroot`, as root), on the host network so it
reaches the test session's PostgreSQL, NATS and the Twilio sandbox on 127.0.0.1, as the
manifests' user, with a fresh directory at each path the manifests mount writable (/tmp, an
emptyDir) as the only writable paths.

buildah answers SIGTERM by killing its child outright, so a service is stopped the way the
kubelet stops it: SIGTERM to the service's own process, found by PID under buildah's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.stack import Launch, RunningService, log_file, process_env, process_tree

BUILDAH = shutil.which("buildah") or "buildah"


def _buildah(*args: str) -> str:
    done = subprocess.run([BUILDAH, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"buildah {args[0]}: {done.stderr.strip()}"
    return done.stdout.strip()


def _cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().split("\0")[:-1]
    except OSError:
        return []


@dataclass
class ContainerService(RunningService):
    argv: tuple[str, ...] = ()

    def service_pid(self) -> int | None:
        """The PID of the service's own process inside the container (not buildah's)."""
        for pid in process_tree(self.process.pid)[1:]:
            # The executable as buildah resolved it on the image's PATH, then the same args.
            found = _cmdline(pid)
            if found[1:] == list(self.argv[1:]) and Path(found[0]).name == self.argv[0]:
                return pid
        return None

    def terminate(self) -> None:
        """SIGTERM to the service's own process, once (buildah would only pass it on)."""
        if self.process.poll() is None and not self.terminated:
            pid = self.service_pid()
            if pid is not None:
                self.terminated = True
                os.kill(pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL to every process under buildah, then to buildah: killed alone, it would
        leave its chroot helper and the service running."""
        if self.process.poll() is None:
            for pid in reversed(process_tree(self.process.pid)[1:]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()


@dataclass
class ImageRunner:
    image: str
    # "uid:gid", as the manifests' securityContext runs the pods.
    user: str
    work_dir: Path
    # The paths the manifests mount writable: each container gets its own fresh directory there.
    writable: Sequence[str] = ("/tmp",)
    # Paths the image leaves writable besides /tmp (world-writable temp dirs of the base),
    # covered read-only, as a read-only root filesystem leaves them.
    read_only: Sequence[str] = ()
    containers: list[str] = field(default_factory=list)

    def _container(self) -> str:
        container = _buildah("from", "--pull=never", self.image)
        self.containers.append(container)
        return container

    def _fresh_dir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="volume-", dir=self.work_dir))
        uid, gid = (int(part) for part in self.user.split(":"))
        os.chown(path, uid, gid)
        return path

    def _mounted_files(self, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        """Files the environment names (`*_FILE`: a signing key, the trusted keys) reach the
        container as the manifests give them, a read-only mount the pod's user can read: a
        copy owned by that user, mounted at `/etc/snapsell/<variable>/`."""
        options, env = [], dict(env)
        uid, gid = (int(part) for part in self.user.split(":"))
        for name, value in list(env.items()):
            host = Path(value)
            if not name.endswith("_FILE") or not host.is_absolute() or not host.is_file():
                continue
            directory = self._fresh_dir()
            copy = directory / host.name
            shutil.copyfile(host, copy)
            os.chown(copy, uid, gid)
            copy.chmod(0o400)
            mount = f"/etc/snapsell/{name.lower()}"
            options.append(f"--volume={directory}:{mount}:ro")
            env[name] = f"{mount}/{host.name}"
        return options, env

    def command(
        self, argv: Sequence[str], env: Mapping[str, str], *, user: bool = True
    ) -> list[str]:
        """`buildah run` of `argv` in a new working container; `user=False` runs it as the
        image's own USER instead of the manifests'."""
        empty = self.work_dir / "empty"
        empty.mkdir(exist_ok=True)
        files, env = self._mounted_files(env)
        options = [
            "--isolation=chroot",
            "--network=host",
            *(f"--volume={self._fresh_dir()}:{path}" for path in self.writable),
            *(f"--volume={empty}:{path}:ro" for path in self.read_only),
            *files,
            *(f"--env={name}={value}" for name, value in env.items()),
        ]
        if user:
            options.append(f"--user={self.user}")
        return [BUILDAH, "run", *options, self._container(), "--", *argv]

    def run(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, *, user: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv, env or {}, user=user),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def launcher(self, commands: Mapping[str, Sequence[str]]) -> Launch:
        """Starts service `name` as `commands[name]` (its manifest's command) in a container,
        with the environment `tools.stack` gives the service."""

        def launch(
            name: str, env: dict[str, str], *, port: int, http: bool, log_dir: Path
        ) -> RunningService:
            full_env = process_env(name, env, port=port, http=http)
            argv = tuple(commands[name])
            log_path = log_file(name, port, log_dir)
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    self.command(argv, full_env),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            return ContainerService(name, port, full_env, process, log_path, http, argv=argv)

        return launch

    def remove_containers(self) -> None:
        while self.containers:
            _buildah("rm", self.containers.pop())

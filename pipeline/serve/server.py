"""Run the tritonserver that nvidia-pytriton bundles, on a model repository, from the serving venv.

`tpaware serve` runs in the main venv and needs nothing from pytriton's Python API: it writes a repository, then runs
the wheel's `tritonserver` binary with the serving venv's `bin/` first on PATH. The Python backend's stub (built for
3.11, linked to Debian's libpython3.11) finds its interpreter through `python3` on PATH, so the model, and the rank
processes it spawns, run on that venv's Python. The venv must come from Debian's /usr/bin/python3.11: from a pyenv
Python the stub would run pyenv's standard library against Debian's libpython and fail to load the model.

The server runs in its own session, so a terminal's Ctrl-C reaches only `tpaware serve`, which then stops it in order
(SIGINT: Triton drains requests and unloads the model, which stops the TP group). Should `tpaware serve` die
abruptly, the kernel sends the server SIGINT (PR_SET_PDEATHSIG), and the ranks stop when their pipe to it closes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError
from pipeline.serve.frontend import Settings
from pipeline.serve.repository import write_repository

VENV_ENV = "TPAWARE_SERVE_VENV"
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = ROOT / ".venv-serve"
# nvidia-pytriton brings tritonclient (HTTP and gRPC); the hint avoids brackets, which the CLI's rich output eats
INSTALL = (f"/usr/bin/python3.11 -m venv {DEFAULT_VENV} && {DEFAULT_VENV}/bin/python -m pip install torch==2.13.0 "
           f"'numpy<2' nvidia-pytriton==0.7.0 transformers -e {ROOT}")
STUB_PYTHON = "3.11"


@dataclass(frozen=True)
class Ports:
    host: str = "127.0.0.1"
    http: int = 8000
    grpc: int = 8001

    @property
    def local_url(self) -> str:
        """Where this machine reaches the HTTP endpoint (a wildcard address is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.http}"


@dataclass(frozen=True)
class BundledTriton:
    """The Triton 2.51 that the nvidia-pytriton wheel ships, inside a serving venv."""

    venv: Path
    dist: Path  # site-packages/pytriton/tritonserver

    @classmethod
    def find(cls, venv: Path | None = None) -> BundledTriton:
        venv = Path(venv or os.environ.get(VENV_ENV) or DEFAULT_VENV).absolute()
        found = sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
        if not found:
            raise InputError(f"no serving venv with nvidia-pytriton at {venv} (set {VENV_ENV} to another one); "
                             f"create it with: {INSTALL}")
        return cls(venv, found[0].parents[1])

    def backends(self, dest: Path) -> Path:
        """A backend folder for the binary: the wheel's Python backend plus the 3.11 stub (kept apart in the wheel)."""
        shutil.copytree(self.dist / "backends", dest)
        shutil.copy2(self.dist / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub",
                     dest / "python" / "triton_python_backend_stub")
        return dest

    def command(self, repository: Path, backends: Path, ports: Ports, exit_timeout: int) -> list[str]:
        return [str(self.dist / "bin" / "tritonserver"), f"--model-repository={repository}",
                f"--backend-directory={backends}", f"--http-address={ports.host}", f"--http-port={ports.http}",
                f"--grpc-address={ports.host}", f"--grpc-port={ports.grpc}", "--allow-metrics=false",
                f"--exit-timeout-secs={exit_timeout}"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        libs = self.dist.parents[1] / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env.pop("PYTHONHOME", None)
        return env


def serve(engine: Path, ports: Ports, settings: Settings, on_ready: Callable[[str], None],
          start_timeout: float = 600.0, exit_timeout: int = 30) -> int:
    """Serve `engine` until SIGINT/SIGTERM or until the server exits; returns the server's exit code."""
    triton = BundledTriton.find()
    with tempfile.TemporaryDirectory(prefix="tpaware-serve-") as tmp:
        repository = Path(tmp) / "models"
        write_repository(engine, repository, settings, copy_engine=False)
        command = triton.command(repository, triton.backends(Path(tmp) / "backends"), ports, exit_timeout)
        return run_server(command, triton.env(), ports, on_ready, start_timeout, exit_timeout)


def run_server(command: list[str], env: dict[str, str], ports: Ports, on_ready: Callable[[str], None],
               start_timeout: float, exit_timeout: int) -> int:
    """Start the server, report readiness, wait; on SIGINT/SIGTERM stop it in order. Nothing is left running."""
    # SIGTERM stops us like Ctrl-C; SIGINT too even where it came ignored (a shell's `cmd &`)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_interrupt_on_parent_death)
    try:
        wait_ready(ports.local_url, start_timeout, alive=lambda: server.poll() is None)
        on_ready(ports.local_url)
        return server.wait()
    except KeyboardInterrupt:
        return _stop(server, exit_timeout)
    finally:
        _stop(server, exit_timeout)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_ready(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll Triton's readiness endpoint until it answers 200 (the model loaded and its TP group is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise InputError("tritonserver exited before it was ready (see its log above)")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} was not ready within {timeout:.0f} s")


def _stop(server: subprocess.Popen, exit_timeout: int) -> int:
    """SIGINT (Triton's orderly shutdown), then SIGKILL if it outlives its exit timeout plus a margin."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(exit_timeout + 60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return server.returncode


def _interrupt_on_parent_death() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG

"""Shared fixtures: the real offline data, a real MLflow server over HTTP, a clean cache."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def data_dir() -> str:
    path = os.environ.get("TAILTUNE_DATA_DIR")
    if not path or not os.path.exists(os.path.join(path, "cifar10.tar.gz")):
        pytest.skip("set TAILTUNE_DATA_DIR to a folder with the offline archives (cifar10.tar.gz, ...)")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return os.environ.get("TAILTUNE_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny tensors: faster, and no OpenMP spinning on a
    shared CPU. A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stack(command: str, root: str, *extra: str) -> subprocess.CompletedProcess:
    """Runs `server/stack.py COMMAND` with its state and secrets inside `root`."""
    return subprocess.run([sys.executable, os.path.join(REPO, "server", "stack.py"), command,
                           "--state-dir", os.path.join(root, "state"),
                           "--env-file", os.path.join(root, ".env"), *extra],
                          capture_output=True, text=True, timeout=300)


def world_readable_tmp() -> str:
    """Returns a fresh folder the `postgres` user can traverse (pytest's tmp_path is 0700 when the
    tests run as root, and PostgreSQL refuses to run as root)."""
    path = tempfile.mkdtemp(prefix="tailtune-stack-", dir="/tmp")
    os.chmod(path, 0o755)
    return path


def _wait_healthy(uri: str, proc: subprocess.Popen | None, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}")
            time.sleep(1)
    raise RuntimeError(f"mlflow server at {uri} not healthy after {timeout_s}s")


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A real MLflow tracking server over HTTP: CI's (PostgreSQL-backed) or one started here."""
    uri = os.environ.get("TAILTUNE_TEST_TRACKING_URI")
    if uri:
        _wait_healthy(uri, None, 30)
        yield uri
        return
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", f"{root}/artifacts",
         "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, proc)
        yield uri
    finally:
        proc.terminate()
        proc.wait(30)

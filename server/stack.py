#!/usr/bin/env python
"""The shared tracking stack without docker: PostgreSQL + an MLflow tracking server on it.

    python server/stack.py start      # creates the database on first use, then starts both
    python server/stack.py health     # one line per service; exit 0 only if both answer
    python server/stack.py stop

PostgreSQL always listens on 127.0.0.1 only; MLflow binds 127.0.0.1 unless `--expose` is given,
which binds 0.0.0.0 and turns on MLflow's basic-auth app (admin password from the env file).
Artifacts are served by the tracking server (--serve-artifacts), so remote Ray workers upload over
HTTP and need no shared disk. Secrets come from the environment, else from the env file (default
`.env` beside docker-compose.yml, git-ignored), which is generated on first start; docker-compose
reads the same file, so both ways of running the stack share one set of names.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STATE_DIR = os.path.join(REPO, "tailtune-server")
DEFAULT_ENV_FILE = os.path.join(REPO, ".env")
# Ports and names shared with docker-compose.yml (tests/test_compose.py keeps them in step).
MLFLOW_PORT = 5000
PG_PORT = 5433
PG_USER = "mlflow"
PG_DB = "mlflow"
PG_AUTH_DB = "mlflow_auth"
ADMIN_USER = "admin"
SECRETS = ("TAILTUNE_PG_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
           "RAY_AUTH_TOKEN")
LOCAL_HOSTS = ("localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*")
STATE_FILE = "stack.json"


class StackError(RuntimeError):
    """A one-line reason the stack could not be started or reached."""


@dataclass
class Settings:
    """What `start` was given; saved in the state dir so that `stop` and `health` find it."""
    host: str = "127.0.0.1"
    port: int = MLFLOW_PORT
    pg_port: int = PG_PORT
    expose: bool = False
    public_names: list[str] = field(default_factory=list)
    workers: int = 2

    @property
    def uri(self) -> str:
        return f"http://{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.port}"

    def allowed_hosts(self) -> str:
        """MLflow 3 rejects unknown Host headers (403); --allowed-hosts replaces its defaults, so
        every name a client uses is listed, with and without a port."""
        names = [*LOCAL_HOSTS]
        for name in self.public_names:
            names += [name, f"{name}:*"]
        return ",".join(names)


# -- secrets -------------------------------------------------------------------------------
def read_env_file(path: str) -> dict[str, str]:
    values = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and not key.startswith("#"):
                    values[key.strip()] = value.strip().strip('"')
    return values


def load_secrets(env_file: str) -> dict[str, str]:
    """Returns every secret: from the environment, else the env file; missing ones are generated
    and appended to the env file (mode 600)."""
    stored = read_env_file(env_file)
    values = {k: os.environ.get(k) or stored.get(k) for k in SECRETS}
    missing = [k for k, v in values.items() if not v]
    if missing:
        fresh = {k: secrets.token_urlsafe(24) for k in missing}
        values.update(fresh)
        existed = os.path.exists(env_file)
        with open(env_file, "a") as f:
            if not existed:
                f.write("# tailtune stack secrets (generated; keep out of version control)\n")
            f.writelines(f"{k}={v}\n" for k, v in fresh.items())
        os.chmod(env_file, 0o600)
    return values


# -- PostgreSQL ----------------------------------------------------------------------------
def pg_bin(name: str) -> str:
    """Returns the path of a PostgreSQL server binary (PATH, else the newest Debian install)."""
    found = shutil.which(name)
    if found:
        return found
    root = "/usr/lib/postgresql"
    versions = sorted(os.listdir(root), key=lambda v: [int(p) for p in v.split(".") if p.isdigit()]) \
        if os.path.isdir(root) else []
    for version in reversed(versions):
        path = os.path.join(root, version, "bin", name)
        if os.path.exists(path):
            return path
    raise StackError(f"PostgreSQL binary '{name}' not found; install the PostgreSQL server (15 or newer)")


def as_postgres(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs a PostgreSQL command; as root, as the `postgres` user (the server refuses root)."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[-300:]
        raise StackError(f"{what} failed: {detail}")


def pg_running(state: str, settings: Settings) -> bool:
    proc = subprocess.run([pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(settings.pg_port)],
                          capture_output=True)
    return proc.returncode == 0 and os.path.exists(os.path.join(state, "pgdata", "postmaster.pid"))


def start_postgres(state: str, settings: Settings, password: str) -> None:
    pgdata, sockets = os.path.join(state, "pgdata"), os.path.join(state, "pg-socket")
    fresh = not os.path.exists(os.path.join(pgdata, "PG_VERSION"))
    for path in (pgdata, sockets):
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(path, "postgres")
    if fresh:
        # Local socket (a 0700 folder) is trusted for admin work; TCP needs a password.
        _check(as_postgres([pg_bin("initdb"), "-D", pgdata, "-U", "postgres", "--auth-local=trust",
                            "--auth-host=scram-sha-256", "-E", "UTF8"]), "initdb")
    if not pg_running(state, settings):
        options = f"-p {settings.pg_port} -k {sockets} -c listen_addresses=127.0.0.1"
        log = os.path.join(pgdata, "server.log")   # inside pgdata: the postgres user owns it
        _check(as_postgres([pg_bin("pg_ctl"), "-D", pgdata, "-o", options, "-l", log, "-w", "start"]),
               f"PostgreSQL start on 127.0.0.1:{settings.pg_port} (see {log})")
    psql = [pg_bin("psql"), "-h", sockets, "-p", str(settings.pg_port), "-U", "postgres",
            "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qtA"]
    role = as_postgres([*psql, "-c", f"SELECT 1 FROM pg_roles WHERE rolname = '{PG_USER}'"])
    _check(role, "PostgreSQL role lookup")
    verb = "ALTER" if role.stdout.strip() == "1" else "CREATE"
    _check(as_postgres([*psql, "-c", f"{verb} ROLE {PG_USER} LOGIN PASSWORD '{password}'"]),
           "PostgreSQL role setup")
    for db in (PG_DB, PG_AUTH_DB):
        exists = as_postgres([*psql, "-c", f"SELECT 1 FROM pg_database WHERE datname = '{db}'"])
        if exists.stdout.strip() != "1":
            _check(as_postgres([*psql, "-c", f"CREATE DATABASE {db} OWNER {PG_USER}"]),
                   f"PostgreSQL database {db}")


def stop_postgres(state: str) -> bool:
    pgdata = os.path.join(state, "pgdata")
    if not os.path.exists(os.path.join(pgdata, "postmaster.pid")):
        return False
    _check(as_postgres([pg_bin("pg_ctl"), "-D", pgdata, "-m", "fast", "-w", "stop"]), "PostgreSQL stop")
    return True


# -- MLflow --------------------------------------------------------------------------------
def backend_uri(settings: Settings, password: str, db: str = PG_DB) -> str:
    return f"postgresql+psycopg2://{PG_USER}:{password}@127.0.0.1:{settings.pg_port}/{db}"


def _pid(state: str) -> int | None:
    try:
        with open(os.path.join(state, "mlflow.pid")) as f:
            pid = int(f.read())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def api_call(settings: Settings, values: dict[str, str], host_header: str | None = None,
             credentials: bool = True, timeout: float = 5) -> tuple[int, str]:
    """Returns (HTTP status, body) of a real tracking API call (not /health, which skips the
    host-header check and authentication)."""
    request = urllib.request.Request(
        f"{settings.uri}/api/2.0/mlflow/experiments/search?max_results=1")
    if host_header:
        request.add_header("Host", host_header)
    if settings.expose and credentials:
        token = base64.b64encode(f"{ADMIN_USER}:{values['MLFLOW_AUTH_ADMIN_PASSWORD']}".encode())
        request.add_header("Authorization", f"Basic {token.decode()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def start_mlflow(state: str, settings: Settings, values: dict[str, str]) -> None:
    if _pid(state) is not None:
        return
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow if os.path.exists(mlflow) else "mlflow", "server",
           "--backend-store-uri", backend_uri(settings, values["TAILTUNE_PG_PASSWORD"]),
           "--artifacts-destination", os.path.join(state, "artifacts"), "--serve-artifacts",
           "--host", settings.host, "--port", str(settings.port), "--workers", str(settings.workers),
           "--allowed-hosts", settings.allowed_hosts()]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",   # ~1.5 GiB of idle workers
           "MLFLOW_FLASK_SERVER_SECRET_KEY": values["MLFLOW_FLASK_SERVER_SECRET_KEY"]}
    if settings.expose:
        ini = os.path.join(state, "basic_auth.ini")
        with open(ini, "w") as f:
            f.write("[mlflow]\ndefault_permission = READ\n"
                    f"database_uri = {backend_uri(settings, values['TAILTUNE_PG_PASSWORD'], PG_AUTH_DB)}\n"
                    f"admin_username = {ADMIN_USER}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        os.chmod(ini, 0o600)
        cmd += ["--app-name", "basic-auth"]
        env.update(MLFLOW_AUTH_CONFIG_PATH=ini, MLFLOW_AUTH_ADMIN_PASSWORD=values["MLFLOW_AUTH_ADMIN_PASSWORD"])
    with open(os.path.join(state, "mlflow.log"), "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)   # its own group: stop kills every worker
    with open(os.path.join(state, "mlflow.pid"), "w") as f:
        f.write(str(proc.pid))
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise StackError(f"MLflow server exited with {proc.returncode}; see {state}/mlflow.log")
        try:
            if api_call(settings, values, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise StackError(f"MLflow server not answering at {settings.uri} after 120 s; see {state}/mlflow.log")


def stop_mlflow(state: str) -> bool:
    pid = _pid(state)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(60):
            os.kill(pid, 0)
            time.sleep(0.5)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.remove(os.path.join(state, "mlflow.pid"))
    return True


# -- commands ------------------------------------------------------------------------------
def load_settings(state: str) -> Settings:
    path = os.path.join(state, STATE_FILE)
    if not os.path.exists(path):
        raise StackError(f"no stack in {state} (run `python server/stack.py start` first)")
    with open(path) as f:
        return Settings(**json.load(f))


def start(args: argparse.Namespace) -> int:
    state = os.path.abspath(args.state_dir)
    os.makedirs(state, exist_ok=True)
    os.chmod(state, 0o711)   # the postgres user must reach pgdata inside it
    saved = load_settings(state) if os.path.exists(os.path.join(state, STATE_FILE)) else Settings()
    settings = Settings(host="0.0.0.0" if args.expose else "127.0.0.1",
                        port=args.port or saved.port, pg_port=args.pg_port or saved.pg_port,
                        expose=args.expose, public_names=args.public_name or [],
                        workers=args.workers)
    if _pid(state) is not None and asdict(settings) != asdict(saved):
        raise StackError(f"the stack in {state} is running with other settings; stop it first")
    values = load_secrets(args.env_file)
    with open(os.path.join(state, STATE_FILE), "w") as f:
        json.dump(asdict(settings), f, indent=1)
    already = _pid(state) is not None and pg_running(state, settings)
    start_postgres(state, settings, values["TAILTUNE_PG_PASSWORD"])
    start_mlflow(state, settings, values)
    word = "already running" if already else "started"
    auth = f"; basic auth on (user {ADMIN_USER}, password in {args.env_file})" if settings.expose else ""
    print(f"stack {word}: MLflow {settings.uri} on PostgreSQL 127.0.0.1:{settings.pg_port}{auth}")
    print(f"  export MLFLOW_TRACKING_URI={settings.uri}")
    return 0


def stop(args: argparse.Namespace) -> int:
    state = os.path.abspath(args.state_dir)
    load_settings(state)
    stopped = [name for name, ok in (("mlflow", stop_mlflow(state)), ("postgres", stop_postgres(state))) if ok]
    print(f"stopped: {', '.join(stopped)}" if stopped else "stack was not running")
    return 0


def health(args: argparse.Namespace) -> int:
    state = os.path.abspath(args.state_dir)
    settings = load_settings(state)
    values = load_secrets(args.env_file)
    pg_ok = pg_running(state, settings)
    print(f"postgres: {'ok' if pg_ok else 'DOWN'} (127.0.0.1:{settings.pg_port}, data {state}/pgdata)")
    try:
        status, body = api_call(settings, values)
        ml_ok = status == 200
        detail = "API answers" if ml_ok else f"API returned HTTP {status}: {body[:120]}"
    except OSError as e:
        ml_ok, detail = False, f"unreachable ({e})"
    print(f"mlflow: {'ok' if ml_ok else 'DOWN'} ({settings.uri}: {detail})")
    return 0 if pg_ok and ml_ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="server/stack.py", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("start", "stop", "health"))
    p.add_argument("--state-dir", default=os.environ.get("TAILTUNE_SERVER_DIR", DEFAULT_STATE_DIR),
                   help="PostgreSQL data, artifacts, logs [env TAILTUNE_SERVER_DIR]")
    p.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="secrets file (generated if missing)")
    p.add_argument("--port", type=int, help=f"MLflow port (default {MLFLOW_PORT})")
    p.add_argument("--pg-port", type=int, help=f"PostgreSQL port (default {PG_PORT})")
    p.add_argument("--workers", type=int, default=2, help="MLflow server workers")
    p.add_argument("--expose", action="store_true",
                   help="bind MLflow to 0.0.0.0 with basic auth on (default: 127.0.0.1, no auth)")
    p.add_argument("--public-name", action="append", metavar="HOST",
                   help="a host name clients use to reach the server (MLflow checks Host headers)")
    args = p.parse_args(argv)
    if args.public_name and not args.expose:
        p.error("--public-name only makes sense with --expose (the default binds 127.0.0.1)")
    try:
        return {"start": start, "stop": stop, "health": health}[args.command](args)
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

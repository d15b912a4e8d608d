"""
Load test: the demo served the production way, under locust, with a worker re-embedding edits.

    SEMANTIC_DATA_DIR=/tmp/load-test .venv/bin/python bench/load_test.py [--articles 300] [--users 10,50]
                                                                         [--minutes 3] [--no-write]

What runs, each in its own process, with the production settings' shape
(DJANGO_DEBUG=0, a real secret key, HTTPS settings off because locust
speaks plain HTTP to 127.0.0.1): gunicorn with 2 workers, one Celery worker
(solo pool, as docker-compose.yml runs it), PostgreSQL and Redis (the
embedded ones of SEMANTIC_DATA_DIR), and locust, headless, with the users of
bench/locustfile.py (visitors' searches: repeated, new, hybrid, filtered;
editors' admin changelist searches and saves). Every visitor comes from
127.0.0.1, so the per-address search limit (tests/test_demo.py checks it) is
raised for the run.

For each user count: requests/s, p50/p95/p99 per request type, errors, and
the resident memory of the web processes and the worker at the start and
end of the run (sampled every 5 s), and the CPU seconds each part used
(what limits the rate on this machine). After the last run the worker is
left to finish, then the invariant is checked on every row an editor
saved: fresh, and its vector and chunks those of its final text. Writes
its table into BENCHMARKS.md between its markers.
"""

import argparse
import csv
import datetime
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.report import elapsed_logger, write_section  # noqa: E402

SAMPLE_SECONDS = 5
CHECKED_ROWS = 60  # edited rows whose chunk vectors are re-encoded and compared


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", type=int, default=300)
    parser.add_argument("--users", default="10,50")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    began = time.perf_counter()
    log = elapsed_logger(began)

    import django

    django.setup()
    from django.conf import settings

    db = settings.DATABASES["default"]
    tag = f"load-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{quote(db['HOST'], safe='')}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DJANGO_SECURE_COOKIES": "0",
        "DJANGO_SECURE_HSTS_SECONDS": "0",
        "SEARCH_RATE": "1000000/m",
        "SEMANTIC_LOAD_TAG": tag,
    }
    manage = [sys.executable, "manage.py"]
    log(f"demo data: {args.articles} articles, embedded")
    subprocess.run([*manage, "demo", "--no-serve", "--limit", str(args.articles)], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    # The admin's CSS and scripts, served by whitenoise as in production.
    subprocess.run([*manage, "collectstatic", "--noinput"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)

    from project.devservices import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "project", "worker", "-Q", "semantic,celery", "--pool", "solo",
         "--prefetch-multiplier", "1", "--loglevel", "WARNING"],
        cwd=ROOT, env=env,
    )
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "project.wsgi:application", "--bind", f"127.0.0.1:{port}", "--workers", "2",
         "--log-level", "warning"],
        cwd=ROOT, env=env,
    )
    runs = []
    try:
        wait_for(url, log)
        warm_up(url, log)
        for users in [int(n) for n in args.users.split(",")]:
            log(f"locust: {users} users for {args.minutes} min")
            runs.append(load(users, args.minutes, url, env, web, worker, log))
        log("waiting for the worker to embed every edit")
        drained_s = drain(log)
        check = check_edited_rows(tag, log)
    finally:
        for process in (web, worker):
            process.terminate()
        for process in (web, worker):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    text = render(args, runs, drained_s, check, time.perf_counter() - began)
    print(text)
    if not args.no_write:
        write_section("load_test", text)
        print(f"\nwritten to {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)
    failures = sum(row["failures"] for run in runs for row in run["rows"] if row["name"] != "Aggregated")
    if failures or not check["ok"]:
        sys.exit(1)


def wait_for(url, log, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn did not answer at {url}")
        time.sleep(0.5)


def warm_up(url, log, requests=12):
    """Searches in parallel until each gunicorn worker has loaded the model.

    A web process loads it on its first query (seconds); without this the
    first run's p99 would be that load, not the steady state.
    """
    from concurrent.futures import ThreadPoolExecutor

    def search(i):
        with urllib.request.urlopen(f"{url}/?q=warm+up+query+{i}", timeout=120) as response:
            return response.status

    with ThreadPoolExecutor(requests) as pool:
        statuses = list(pool.map(search, range(requests)))
    log(f"warm-up: {len(statuses)} searches, statuses {sorted(set(statuses))}")


def tree(process):
    """The process and its children (gunicorn's workers)."""
    parent = psutil.Process(process.pid)
    return [parent, *parent.children(recursive=True)]


def rss_mb(process):
    return sum(p.memory_info().rss for p in tree(process)) / 2**20


def cpu_seconds(processes):
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def postmaster():
    """This data directory's postmaster (not another cluster's on the machine)."""
    from django.conf import settings

    pgdata = str(Path(settings.DATA_DIR) / "postgres")
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] and pgdata in process.info["cmdline"]:
            return process
    raise RuntimeError(f"no postmaster for {pgdata}")


def tree_cpu(root):
    """CPU seconds used by ``root`` and every process it started, ended ones included.

    A process that has ended (a PostgreSQL backend after its connection
    closed) counts in its parent's children_* times once reaped; those
    still running count their own.
    """
    try:
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    return total + cpu_seconds(children)


def machine_busy_seconds():
    """CPU seconds the whole machine spent busy (every process, this run's or not)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def load(users, minutes, url, env, web, worker, log):
    """One locust run; returns its stats rows, memory samples and CPU shares."""
    samples = {"web": [], "worker": []}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples["web"].append(rss_mb(web))
            samples["worker"].append(rss_mb(worker))
            stop.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    csv_prefix = Path(env.get("TMPDIR", "/tmp")) / f"semantic-load-{users}"
    parts = {"web (gunicorn)": psutil.Process(web.pid), "worker (celery)": psutil.Process(worker.pid), "PostgreSQL": postmaster()}
    cpu_before = {name: tree_cpu(root) for name, root in parts.items()}
    busy_before = machine_busy_seconds()
    started = time.perf_counter()
    sampler.start()
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless", "-u", str(users),
         "-r", str(max(1, users // 5)), "--run-time", f"{int(minutes * 60)}s", "--host", url, "--csv", str(csv_prefix),
         "--only-summary", "--loglevel", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    locust_process = psutil.Process(locust.pid)
    locust_cpu = 0.0
    while locust.poll() is None:
        try:
            locust_cpu = cpu_seconds([locust_process])
        except psutil.NoSuchProcess:
            break
        time.sleep(1)
    stderr = locust.stderr.read()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - started
    cpu = {name: tree_cpu(root) - cpu_before[name] for name, root in parts.items()}
    cpu["locust"] = locust_cpu
    # Whatever else ran on the machine meanwhile: how noisy the run was.
    cpu["other processes"] = max(0.0, machine_busy_seconds() - busy_before - sum(cpu.values()))
    rows = read_stats(Path(f"{csv_prefix}_stats.csv"))
    if not rows:
        raise RuntimeError(f"locust wrote no statistics:\n{stderr[-3000:]}")
    own = [r for r in rows if r["name"] != "Aggregated"]
    log(f"{users} users: {sum(r['requests'] for r in own)} requests, {sum(r['failures'] for r in own)} failures")
    return {"users": users, "seconds": seconds, "rows": rows, "samples": samples, "cpu": cpu}


def read_stats(path):
    rows = []
    if not path.exists():
        return rows
    with open(path, newline="") as file:
        for record in csv.DictReader(file):
            rows.append(
                {
                    "type": record["Type"],
                    "name": record["Name"],
                    "requests": int(record["Request Count"]),
                    "failures": int(record["Failure Count"]),
                    "rps": float(record["Requests/s"]),
                    "p50": record["50%"],
                    "p95": record["95%"],
                    "p99": record["99%"],
                }
            )
    return rows


def drain(log, timeout=900):
    from project.demo.models import Article
    from semantic.status import count_statuses

    field = Article._meta.get_field("embedding")
    started = time.perf_counter()
    while count_statuses(field)["pending"]:
        if time.perf_counter() - started > timeout:
            raise RuntimeError("the worker did not embed every edit in time")
        time.sleep(2)
    return time.perf_counter() - started


def check_edited_rows(tag, log):
    """Every row an editor saved: fresh, with its final text's chunks and their vectors."""
    from project.demo.models import Article
    from semantic.chunking import Chunker
    from semantic.status import FRESH, embedding_status

    field = Article._meta.get_field("embedding")
    edited = list(Article.objects.filter(title__contains=f"[{tag} "))
    not_fresh = [row.pk for row in edited if embedding_status(field, row) != FRESH]
    wrong = []
    chunker = Chunker(field.encoder, field.overlap)
    for row in edited[:CHECKED_ROWS]:
        text = field.build_text(row)
        expected = chunker.split(text)
        stored = list(row.embedding_chunks.order_by("index"))
        vectors, failed = field.encoder.encode([chunk.text for chunk in expected])
        if failed or [c.text for c in stored] != [c.text for c in expected] or not np.allclose(
            np.array([c.embedding for c in stored]), np.stack(vectors), atol=1e-4
        ):
            wrong.append(row.pk)
    log(f"edited rows: {len(edited)}; not fresh: {len(not_fresh)}; vectors checked: {min(len(edited), CHECKED_ROWS)}, wrong: {len(wrong)}")
    return {"edited": len(edited), "not_fresh": not_fresh, "checked": min(len(edited), CHECKED_ROWS), "wrong": wrong,
            "ok": bool(edited) and not not_fresh and not wrong}


def limit_statement(run):
    """What limited the run, from the CPU it used: the cores (and which part used them), or something else."""
    available = run["seconds"] * os.cpu_count()
    busy = sum(run["cpu"].values()) / available
    ours = {name: value for name, value in run["cpu"].items() if name != "other processes"}
    top = max(ours, key=ours.get)
    if busy >= 0.85:
        return (
            f"The cores were {busy:.0%} busy: the rate is bound by CPU, most of it {top}'s "
            "(embedding each new query with the model, in the web process)."
            if top.startswith("web") else f"The cores were {busy:.0%} busy: the rate is bound by CPU, most of it {top}'s."
        )
    return (
        f"The cores were only {busy:.0%} busy: the users' own pace (each waits between requests) "
        "set the rate; the server had room for more."
    )


def render(args, runs, drained_s, check, seconds):
    lines = [
        "## Load test",
        "",
        f"`bench/load_test.py --articles {args.articles} --users {args.users} --minutes {args.minutes:g}`, "
        f"{datetime.date.today()}. gunicorn (2 workers), one Celery worker (solo pool), embedded PostgreSQL and Redis, "
        "DJANGO_DEBUG=0 with the production settings (HTTPS settings off: plain HTTP on 127.0.0.1), locust headless "
        "after 12 parallel searches that load the model in each web process (bench/locustfile.py: 9 of 10 users search the demo page anonymously, 1 in 10 is a signed-in editor: "
        "admin changelist searches and ORM saves that make rows stale), all on the same "
        f"{os.cpu_count()} shared cores. Whole run {seconds / 60:.1f} min.",
        "",
    ]
    for run in runs:
        total = sum(row["requests"] for row in run["rows"] if row["name"] != "Aggregated")
        failures = sum(row["failures"] for row in run["rows"] if row["name"] != "Aggregated")
        web, worker = run["samples"]["web"], run["samples"]["worker"]
        lines += [
            f"**{run['users']} users, {run['seconds'] / 60:.1f} min**: {total:,} requests, {failures} errors; "
            f"RSS web {web[0]:.0f} → {web[-1]:.0f} MB (max {max(web):.0f}), worker {worker[0]:.0f} → {worker[-1]:.0f} MB "
            f"(max {max(worker):.0f}), sampled every {SAMPLE_SECONDS} s.",
            "",
            "| request | requests | errors | req/s | p50 ms | p95 ms | p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in run["rows"]:
            label = "**all**" if row["name"] == "Aggregated" else f"{row['name']}"
            lines.append(f"| {label} | {row['requests']:,} | {row['failures']} | {row['rps']:.1f} | {row['p50']} | {row['p95']} | {row['p99']} |")
        cpu_total = sum(run["cpu"].values())
        lines += [
            "",
            "CPU seconds used during the run (of "
            f"{run['seconds'] * os.cpu_count():.0f} available): "
            + ", ".join(f"{name} {value:.0f} ({value / cpu_total:.0%})" for name, value in run["cpu"].items())
            + ". " + limit_statement(run),
            "",
        ]
    lines += [
        f"After the runs the worker needed {drained_s:.0f} s more to embed every edit. Rows saved by editors: "
        f"{check['edited']}; not fresh: {len(check['not_fresh'])}; of {check['checked']} re-encoded, chunks or "
        f"vectors different from their final text's: {len(check['wrong'])}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from project.demo.models import Article
from semantic.status import count_statuses


class Command(BaseCommand):
    help = (
        "Run the whole demo: migrate, load the BBC News corpus, start a Celery worker, "
        "wait for it to embed every article (with a progress bar), then serve the search "
        "page. Ctrl-C stops the server, the worker, and the local PostgreSQL and Redis."
    )

    def add_arguments(self, parser):
        parser.add_argument("addrport", nargs="?", default="127.0.0.1:8000", help="Where to serve (default 127.0.0.1:8000).")
        parser.add_argument("--limit", type=int, default=None, help="Load at most this many articles.")
        parser.add_argument("--no-serve", action="store_true", help="Stop after embedding instead of serving.")

    def handle(self, *args, addrport, limit, no_serve, **options):
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("Database migrated.")
        call_command("load_demo_corpus", limit=limit)
        self._ensure_admin()
        worker = self._start_worker()
        try:
            self._wait_for_embeddings(worker)
            if no_serve:
                return
            self.stdout.write(f"Search page: http://{addrport}/   Admin: http://{addrport}/admin/ (demo / demo)")
            call_command("runserver", addrport, use_reloader=False)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()

    def _ensure_admin(self):
        from django.contrib.auth import get_user_model

        User = get_user_model()
        if not User.objects.filter(username="demo").exists():
            User.objects.create_superuser("demo", "demo@example.com", "demo")
            self.stdout.write("Created the admin user demo / demo.")

    def _start_worker(self):
        env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
        queues = f"celery,{settings.SEMANTIC.get('QUEUE', 'semantic')}"
        command = [sys.executable, "-m", "celery", "-A", "project", "worker", "--pool", "solo", "-Q", queues, "--loglevel", "WARNING"]
        self.stdout.write("Starting a Celery worker: " + " ".join(command[1:]))
        return subprocess.Popen(command, cwd=settings.BASE_DIR, env=env)

    def _wait_for_embeddings(self, worker):
        field = Article._meta.get_field("embedding")
        total = count_statuses(field)["with_text"]
        with tqdm(total=total, desc="Embedding articles", unit="article") as bar:
            while True:
                done = total - count_statuses(field)["pending"]
                bar.update(done - bar.n)
                if done >= total:
                    return
                if worker.poll() is not None:
                    raise CommandError(f"The Celery worker exited with status {worker.returncode}.")
                time.sleep(0.5)

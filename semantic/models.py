"""
No models of its own: the app's tables are its users' (an EmbeddingField adds
columns and a chunk model to the model that declares it).

The module exists because Django sends ``pre_migrate`` and ``post_migrate``
only to apps with a models module, and this app listens to both: pgvector is
created before migrations run, and the triggers of sources that follow
relations are installed after (semantic.apps).
"""

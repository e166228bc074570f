"""Reranking generated samples by text-image similarity [P §2.6].

- :mod:`.model`: the small contrastive model (``ContrastiveReranker``, ``RerankerConfig``).
- :mod:`.train`: ``train_reranker``, ``save_reranker``, ``load_reranker`` (``dalle-dist train-reranker``).
- :mod:`.clip`: a local open_clip checkpoint instead (optional package).
- :mod:`.scorer`: which of the two ``dalle-dist generate --rerank K`` uses, and ranking.

Nothing is imported here, so that building the command-line parser stays cheap. docs/reranking.md has details.
"""

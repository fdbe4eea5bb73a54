"""Pictures of classification episodes (engine/pictures.py registers them with ``@picture_maker``):
the episode picture (support images, queries with predicted and true labels) and the embedding picture
(2-D PCA of support, query and prototype embeddings, for learners with ``embed_episode``)."""

from __future__ import annotations

"""The embedding model the router serves: its id and the size of its vectors.

Kept apart from ``embedder.py`` so that the HTTP layer (request schemas, OpenAPI) never imports torch: the
server then listens and answers 503 ``router_not_ready`` while torch and the model load in the background.
"""

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384

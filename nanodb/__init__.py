"""nanodb: a multimodal vector database for images (CLIP embeddings, exact cosine k-NN search).

The public names are imported on first use, so a decode worker that unpickles one small class of the
media layer does not import the whole database (and its model runtimes) with it.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "NanoDB": "nanodb.database",
    "SearchResult": "nanodb.database",
    "Item": "nanodb.database",
    "ValidationReport": "nanodb.database",
    "DuplicateGroup": "nanodb.database",
    "DatabaseError": "nanodb.storage.format",
    "ModelLoadError": "nanodb.model.spec",
    "QueryError": "nanodb.search.query",
    "RayOptions": "nanodb.cluster",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'nanodb' has no attribute {name!r}")

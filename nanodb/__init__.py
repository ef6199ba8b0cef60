"""nanodb: a multimodal vector database for images (CLIP embeddings, exact cosine k-NN search)."""

from nanodb.database import Item, NanoDB, SearchResult, ValidationReport
from nanodb.model import ModelLoadError
from nanodb.query import QueryError
from nanodb.storage import DatabaseError

__all__ = ["NanoDB", "SearchResult", "Item", "ValidationReport", "DatabaseError", "ModelLoadError", "QueryError"]
__version__ = "0.1.0"

"""ragserve: self-hosted model serving for RAG stacks."""

__version__ = "0.1.0"

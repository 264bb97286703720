"""edge-llm: a small LLM on an edge board, streamed over gRPC."""

__version__ = "0.1.0"

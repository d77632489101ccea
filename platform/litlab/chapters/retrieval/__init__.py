"""Chapter 12, LLM techniques: a dense bi-encoder retriever trained with InfoNCE (`retriever`) and
retrieval-augmented generation with it (`rag`), on the pydoc passages; importing registers them."""

from litlab.chapters.retrieval import module, rag  # noqa: F401

"""Interop writers: kimiq checkpoints -> files other engines load (``gguf`` for llama.cpp)."""

"""Local language models: GGUF llama-family models on the C core.

model.py (weights -> C decoder), spec.py (what a llama GGUF must hold), tokenizer.py (byte-level BPE via the
tokenizers library), chat_template.py (jinja2 sandbox), sampler.py, store.py (model cache and pull), llm.py (the LLM
facade users call).
"""
from .llm import DEFAULT_MODEL, LLM, ContextLengthError, GenerationResult

__all__ = ["DEFAULT_MODEL", "LLM", "ContextLengthError", "GenerationResult"]

"""Model-file readers. Each validates everything it reads; none imports from the layers above (llm, session)."""

"""Text classification: BBC News or any CSV / JSONL, MiniLM-L6 or any HF sequence classifier, text trojans and
held-out character- and word-level attacks."""

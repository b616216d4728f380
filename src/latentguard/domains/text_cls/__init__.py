"""Text classification: BBC News or any CSV / JSONL, MiniLM-L6 or any HF sequence classifier, text trojans and
held-out character- and word-level attacks. Importing the package registers the built-in trigger and attack
kinds, as a plugin registers its own."""

from latentguard.domains.text_cls import attacks, trojans

__all__ = ["attacks", "trojans"]

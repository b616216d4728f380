"""The built-in tasks, registered by import path so that a domain's libraries load only when it is used."""

from latentguard.registry import TASKS

TASKS.register("image_cls", "latentguard.domains.image.task:ImageTask")
TASKS.register("text_cls", "latentguard.domains.text_cls.task:TextClassificationTask")
TASKS.register("text_gen", "latentguard.domains.text_gen.task:TextGenerationTask")

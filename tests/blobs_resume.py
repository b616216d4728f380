"""Train LAT on the blobs task for 6 steps, whole or as 3 steps, a checkpoint and a resumed 3 more.

``python tests/blobs_resume.py OUT.safetensors whole|split`` (alone or under ``accelerate launch``) writes
the final weights; the FSDP test compares a split run under FSDP2 with a whole run in one process, so a
checkpoint gathered from shards and scattered back (weights, Adam state and the KL reference weights) must
resume exactly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from blobs_task import BlobConfig, BlobTask, fsdp_on_cpu

from latentguard.engine.attack import PGDConfig
from latentguard.engine.threat import Threat
from latentguard.engine.trainer import DefenseConfig, TrainConfig, Trainer

LAT = DefenseConfig(
    kind="lat",
    sites=["block"],
    threat=Threat(norm="l2", epsilon=0.5, epsilon_mode="relative"),
    pgd=PGDConfig(steps=3, random_start=False),
    clean_weight=0.5,
    kl_weight=1.0,
)


def trainer(task: BlobTask, steps: int, checkpoint: Path | None) -> Trainer:
    """A fresh model and trainer (a trainer that has run under FSDP2 holds only its shard)."""
    torch.manual_seed(0)
    config = TrainConfig(steps=steps, lr=0.01, log_every=1)
    return Trainer(task.build_model(), task.io, LAT, config, checkpoint=checkpoint, progress=False)


def main(out: Path, mode: str) -> None:
    task = BlobTask(BlobConfig(), seed=0, device="cpu")
    checkpoint = out.with_suffix(".checkpoint.safetensors") if mode == "split" else None
    if checkpoint is not None:
        trainer(task, 3, checkpoint).fit(task.defense_loader(32))
    final = trainer(task, 6, checkpoint)
    result = final.fit(task.defense_loader(32))
    assert result.steps == 6
    final.save_model(out, {"processes": final.accelerator.num_processes, "sharded": final.sharded})


if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_on_cpu()
    main(Path(sys.argv[1]), sys.argv[2])

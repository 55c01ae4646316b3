"""Stage `heal`: continued training of the pruned model on its language's text (resumes from checkpoints).

With heal_launch.processes > 1 it runs as that many processes under torchrun and trains data-parallel (sharded with
heal_launch.fsdp) with the same global batch."""
import time
from pathlib import Path

from layerprune.files import write_json
from layerprune.heal import heal_model
from layerprune.heal_corpus import MANIFEST
from layerprune.models import ModelInfo, pick_device
from layerprune.stage import run_stage, write_timing
from layerprune.strategies import Choice


def main(params, model_info, pruned_dir, choice, shards, checkpoints, curves, healed_dir, metrics):
    started = time.perf_counter()
    base_dir = ModelInfo.load(model_info).model_dir()
    result = heal_model(
        params.heal,
        params.heal_launch,
        pruned_dir=pruned_dir,
        base_dir=base_dir,
        dropped=Choice.load(choice).dropped,
        shards=shards,
        checkpoints=checkpoints,
        log_dir=curves,
        out_dir=healed_dir,
        device=pick_device(params.model.device),
        # the corpus manifest holds every shard's sha256: the shards themselves are not read to hash them
        fingerprint_inputs=[pruned_dir, base_dir, choice, Path(shards) / MANIFEST],
    )
    if result.is_main_process:
        write_json(metrics, result.metrics())
        write_timing(metrics, stage_seconds=time.perf_counter() - started, **result.timing())


if __name__ == "__main__":
    run_stage(main, "model_info", "pruned_dir", "choice", "shards", "checkpoints", "curves", "healed_dir", "metrics",
              description=__doc__, processes=lambda params: params.heal_launch.processes,
              distributed=lambda params: params.heal_launch.fsdp)

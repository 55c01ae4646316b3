"""Stage `heal`: continued training of the pruned model on its language's text (resumes from checkpoints).

With heal.processes > 1 it runs as that many processes under torchrun and trains data-parallel with the same global
batch."""
import time

from layerprune.files import read_jsonl, write_json
from layerprune.heal import heal_model
from layerprune.models import ModelInfo, pick_device
from layerprune.stage import run_stage, write_timing
from layerprune.strategies import Choice


def main(params, model_info, pruned_dir, choice, corpus, eval_texts, checkpoints, curves, healed_dir, metrics):
    started = time.perf_counter()
    base_dir = ModelInfo.load(model_info).model_dir()
    result = heal_model(
        params.heal,
        pruned_dir=pruned_dir,
        base_dir=base_dir,
        dropped=Choice.load(choice).dropped,
        articles=read_jsonl(corpus),
        held_out_ids={row["id"] for row in read_jsonl(eval_texts)},
        checkpoints=checkpoints,
        log_dir=curves,
        out_dir=healed_dir,
        device=pick_device(params.model.device),
        fingerprint_inputs=[pruned_dir, base_dir, choice, corpus, eval_texts],
    )
    if result.is_main_process:
        write_json(metrics, result.metrics())
        write_timing(metrics, stage_seconds=time.perf_counter() - started, **result.timing())


if __name__ == "__main__":
    run_stage(main, "model_info", "pruned_dir", "choice", "corpus", "eval_texts", "checkpoints", "curves",
              "healed_dir", "metrics", description=__doc__, processes=lambda params: params.heal.processes)

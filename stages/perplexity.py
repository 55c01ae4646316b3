"""Stages `perplexity-base`, `perplexity-pruned` and `perplexity-healed`: lm-eval perplexity of one model on the
held-out texts, and the lm-eval tasks of eval.tasks. One script for all three, so that a prune or heal param never
re-evaluates the base model; the `release` stage compares them.

`perplexity-healed` also gets the heal's metrics and the pruned stage's outputs: when the heal trained nothing
(heal.tokens: 0) the healed weights are the pruned ones, and their numbers are the pruned stage's, copied rather than
measured again (minutes of lm-eval on a large model)."""
import tempfile
from pathlib import Path

from layerprune.files import atomic_write_bytes, read_json, significant, write_json
from layerprune.models import ModelInfo, count_parameters, num_layers
from layerprune.perplexity import PERPLEXITY_METRICS, evaluate_perplexity
from layerprune.stage import run_stage, write_timing


def main(params, model_info, eval_texts, metrics, results, model_dir=None, heal_metrics=None, pruned_metrics=None,
         pruned_results=None):
    """Without model_dir, scores the base model. With heal_metrics, pruned_metrics and pruned_results, copies the
    last two when the heal trained nothing."""
    # The heal's own record, not inode equality of the two folders: a DVC cache of type copy checks the healed
    # folder out as copies of the same weights. The release stage reads the same field.
    if heal_metrics and read_json(heal_metrics)["tokens"] == 0:
        for source, target in ((pruned_metrics, metrics), (pruned_results, results)):
            # a new file renamed into place, never a link: the pruned stage's results file is linked into the DVC cache
            atomic_write_bytes(target, Path(source).read_bytes())
        print(f"perplexity: reused {pruned_metrics} and {pruned_results}: {heal_metrics} says the heal trained 0 "
              "tokens (heal.tokens: 0), so the healed weights are the pruned ones; lm-eval not run", flush=True)
        # 0 seconds rather than no timing: a skipped write would leave an earlier heal's evaluation time in logs/
        write_timing(metrics, seconds=0.0)
        return
    model_dir = Path(model_dir or ModelInfo.load(model_info).model_dir())
    with tempfile.TemporaryDirectory() as work:
        measured = evaluate_perplexity(model_dir, Path(eval_texts), max_length=params.eval.max_length,
                                       batch_size=params.eval.batch_size, device=params.model.device,
                                       work_dir=Path(work), tasks=params.eval.tasks,
                                       include_path=params.eval.include_path)
    write_json(results, significant(measured["results"]))
    write_timing(metrics, seconds=measured["seconds"], tokens_per_second=measured["tokens_per_second"])
    write_json(metrics, {
        **significant({metric: measured[metric] for metric in PERPLEXITY_METRICS}),
        "tasks": significant(measured["tasks"]),
        "num_texts": measured["num_texts"],
        "dropped_texts": measured["dropped_texts"],
        "num_tokens": measured["num_tokens"],
        "layers": num_layers(model_dir),
        "parameters": count_parameters(model_dir),
        "size_on_disk_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
    })


if __name__ == "__main__":
    run_stage(main, "model_info", "eval_texts", "metrics", "results",
              optional=("model_dir", "heal_metrics", "pruned_metrics", "pruned_results"), description=__doc__)

"""Stages `perplexity-base`, `perplexity-pruned` and `perplexity-healed`: lm-eval perplexity of one model on the
held-out texts, and the lm-eval tasks of eval.tasks. One script for all three, so that a prune or heal param never
re-evaluates the base model; the `release` stage compares them."""
import tempfile
from pathlib import Path

from layerprune.files import significant, write_json
from layerprune.models import ModelInfo, count_parameters, num_layers
from layerprune.perplexity import PERPLEXITY_METRICS, evaluate_perplexity
from layerprune.stage import run_stage, write_timing


def main(params, model_info, eval_texts, metrics, results, model_dir=None):
    """Without model_dir, scores the base model."""
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
    run_stage(main, "model_info", "eval_texts", "metrics", "results", optional=("model_dir",), description=__doc__)

"""Stages `perplexity-base` and `perplexity-pruned`: lm-eval perplexity of a model on the held-out texts.

One script, two stages, so that changing a prune param never re-evaluates the base model. With --base-metrics
(the pruned run) it also compares against the base, writes the comparison plot and the full model card.
"""
import json
import tempfile
from pathlib import Path

from layerprune.card import render_card
from layerprune.files import atomic_write_text, write_csv, write_json
from layerprune.models import ModelInfo, count_parameters, num_layers
from layerprune.perplexity import METRICS, evaluate_perplexity
from layerprune.stage import run_stage


def measure(params, model_dir: Path, eval_texts, results) -> dict:
    with tempfile.TemporaryDirectory() as work:
        measured = evaluate_perplexity(model_dir, Path(eval_texts), max_length=params.eval.max_length,
                                       batch_size=params.eval.batch_size, device=params.model.device,
                                       work_dir=Path(work))
    write_json(results, measured.pop("results"))
    return {
        **measured,
        "layers": num_layers(model_dir),
        "parameters": count_parameters(model_dir),
        "size_on_disk_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
    }


def main(params, model_info, eval_texts, metrics, results, model_dir=None, base_metrics=None, plot=None, card=None,
         choice=None, corpus_metrics=None, sample_metrics=None, merge_config=None):
    """Without model_dir, scores the base model; with it (the pruned model) it compares against base_metrics."""
    model_dir = Path(model_dir or ModelInfo.load(model_info).model_dir())
    measured = measure(params, model_dir, eval_texts, results)
    if base_metrics is None:
        write_json(metrics, measured)
        return
    base = json.loads(Path(base_metrics).read_text())
    measured["relative_increase"] = {m: round(measured[m] / base[m] - 1, 6) for m in METRICS}
    write_json(metrics, measured)
    write_csv(plot, [{"model": name, **{m: values[m] for m in METRICS}} for name, values in
                     (("base", base), ("pruned", measured))])
    atomic_write_text(card, render_card(
        lang=params.lang, model_info=model_info, choice=choice, corpus_metrics=corpus_metrics,
        sample_metrics=sample_metrics, merge_config=merge_config, perplexity={"base": base, "pruned": measured},
    ))


if __name__ == "__main__":
    run_stage(main, "model_info", "eval_texts", "metrics", "results", optional=(
        "model_dir", "base_metrics", "plot", "card", "choice", "corpus_metrics", "sample_metrics", "merge_config",
    ), description=__doc__)

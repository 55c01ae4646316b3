"""Stage `release`: the folder to publish with `hf upload` (weights, tokenizer, config, the model card with every
number and picture, mergekit_config.yml), base vs pruned vs healed side by side, and a copy of the card for git.

The weights are those of the healed model (the pruned one's, hardlinked, when heal.tokens is 0); they are hardlinked
here too, so editing the card reruns this stage alone, in seconds, and never copies gigabytes."""
from pathlib import Path

from layerprune.card import render_card
from layerprune.files import atomic_dir, atomic_write_text, link_or_copy, read_json, significant, write_csv, write_json
from layerprune.models import ModelInfo
from layerprune.perplexity import PERPLEXITY_METRICS
from layerprune.stage import run_stage
from layerprune.strategies import Choice


def main(params, model_info, weights, merge_config, choice, corpus_metrics, sample_metrics, perplexity_base,
         perplexity_pruned, perplexity_healed, heal_metrics, heal_corpus_metrics, heatmap, release_dir, card, plot,
         metrics):
    perplexity = {"base": read_json(perplexity_base), "pruned": read_json(perplexity_pruned)}
    heal = None
    if read_json(heal_metrics)["tokens"]:  # heal.tokens: 0 leaves the pruned model
        perplexity["healed"] = read_json(perplexity_healed)
        heal = {"params": params.heal.model_dump(), "metrics": read_json(heal_metrics),
                "corpus": read_json(heal_corpus_metrics)}
    images = {"similarity_heatmap.png": "Layer similarity: the distance of every block of layers; red: the cut"}
    merge_yaml = Path(merge_config).read_text()
    text = render_card(lang=params.lang, info=ModelInfo.load(model_info), choice=Choice.load(choice),
                       corpus=read_json(corpus_metrics), sample=read_json(sample_metrics), merge_yaml=merge_yaml,
                       perplexity=perplexity, heal=heal, images=images)
    with atomic_dir(release_dir) as folder:
        for file in Path(weights).iterdir():
            if file.name not in ("README.md", "mergekit_config.yml", *images):  # written here, never into a link
                link_or_copy(file, folder / file.name)
        (folder / "README.md").write_text(text, encoding="utf-8")
        (folder / "mergekit_config.yml").write_text(merge_yaml, encoding="utf-8")
        link_or_copy(Path(heatmap), folder / "similarity_heatmap.png")
    atomic_write_text(card, text)
    write_csv(plot, [{"model": model, **{m: values[m] for m in PERPLEXITY_METRICS}}
                     for model, values in perplexity.items()])
    write_json(metrics, compare(perplexity))


def compare(perplexity: dict[str, dict]) -> dict:
    """Each model's change against the base, and the share of the pruning gap that healing closed (bits per byte)."""
    base = perplexity["base"]
    out = {f"{model}_vs_base": {m: significant(values[m] / base[m] - 1) for m in PERPLEXITY_METRICS}
           for model, values in perplexity.items() if model != "base"}
    gap = perplexity["pruned"]["bits_per_byte"] - base["bits_per_byte"]
    if "healed" in perplexity and gap > 0:
        out["gap_closed"] = significant((perplexity["pruned"]["bits_per_byte"] - perplexity["healed"]["bits_per_byte"]) / gap)
    return out


if __name__ == "__main__":
    run_stage(main, "model_info", "weights", "merge_config", "choice", "corpus_metrics", "sample_metrics",
              "perplexity_base", "perplexity_pruned", "perplexity_healed", "heal_metrics", "heal_corpus_metrics",
              "heatmap", "release_dir",
              "card", "plot", "metrics", description=__doc__)

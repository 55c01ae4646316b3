"""End to end on the embedded default (real model, real text), small sizes, in a throwaway git repo."""
import json
import math

import pytest
from transformers import AutoConfig

from layerprune.params import load_params
from layerprune.texts import read_jsonl
from pipeline_repo import PipelineRepo

pytestmark = pytest.mark.slow

ALL_STAGES = {"model", "fetch-wiki", "sample", "layer-similarity", "choose-range", "mergekit-slice",
              "perplexity-base", "perplexity-pruned"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = PipelineRepo.create(tmp_path_factory.mktemp("pipeline"))
    first = repo.dvc("repro")
    assert repo.stages_run(first) == ALL_STAGES
    repo.commit("baseline: es")
    return repo


def test_repro_writes_every_stage_output(repo):
    params = load_params(repo.root / "params.yaml")
    info = repo.json("models/base.json")
    assert info["architecture"] == "Gemma3ForCausalLM" and info["num_layers"] == 18
    calibration = read_jsonl(repo.root / "data/calibration.jsonl")
    held_out = read_jsonl(repo.root / "data/eval.jsonl")
    assert len(calibration) == params.sample.calibration and len(held_out) == params.sample.eval
    assert not {t["id"] for t in calibration} & {t["id"] for t in held_out}

    choice = repo.json("metrics/choice.json")
    assert choice["n"] == params.prune.layers and choice["layers_kept"] == 18 - params.prune.layers
    pruned = AutoConfig.from_pretrained(repo.root / "models/pruned")
    assert pruned.num_hidden_layers == choice["layers_kept"] == len(pruned.layer_types)
    assert "## Perplexity" in (repo.root / "models/pruned/README.md").read_text()


def test_pruned_perplexity_is_finite_and_above_the_base(repo):
    base, pruned = repo.json("metrics/perplexity_base.json"), repo.json("metrics/perplexity_pruned.json")
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(base[metric]) and math.isfinite(pruned[metric])
        assert pruned[metric] > base[metric]
        assert pruned["relative_increase"][metric] == pytest.approx(pruned[metric] / base[metric] - 1, rel=1e-4)
    assert pruned["parameters"] == repo.json("metrics/choice.json")["parameters_after"]
    card = (repo.root / "reports/model_card.md").read_text()
    assert f"{base['word_perplexity']:.2f}" in card and f"{pruned['word_perplexity']:.2f}" in card


def test_second_repro_runs_nothing(repo):
    assert repo.stages_run(repo.dvc("repro")) == set()


@pytest.mark.parametrize("change, expected", [
    ("lang=de", ALL_STAGES - {"model"}),
    # the held-out set does not depend on the calibration count, so the base model is not evaluated again
    ("sample.calibration=10", {"sample", "layer-similarity", "choose-range", "mergekit-slice", "perplexity-pruned"}),
    ("prune.layers=3", {"choose-range", "mergekit-slice", "perplexity-pruned"}),
])
def test_a_change_reruns_exactly_the_affected_stages(repo, change, expected):
    repo.reset()
    ran = repo.stages_run(repo.dvc("exp", "run", "-S", change))
    assert ran == expected
    # the same setting again: nothing executes (up to date, or restored from the run cache)
    assert repo.stages_run(repo.dvc("exp", "run", "-S", change)) == set()


def test_experiments_compare_across_languages(repo):
    repo.reset()
    repo.dvc("exp", "run", "-n", "german", "-S", "lang=de")
    repo.reset()
    diff = json.loads(repo.dvc("plots", "diff", "HEAD", "german", "--json").stdout)["data"]
    for plot in ("plots/distance_by_start.csv", "plots/perplexity.csv"):
        (rendered,) = diff[plot]  # one chart, both revisions drawn over each other
        assert set(rendered["revisions"]) == {"HEAD", "german"}, plot
        assert {row["rev"] for row in rendered["content"]["data"]["values"]} == {"HEAD", "german"}, plot
    assert {rev for image in diff["plots/similarity_heatmap.png"] for rev in image["revisions"]} == {"HEAD", "german"}
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert '"lang": "de"' in text and "word_perplexity" in text and '"start"' in text
    metrics = repo.dvc("metrics", "diff", "HEAD", "german").stdout
    assert "metrics/perplexity_pruned.json" in metrics and "word_perplexity" in metrics
    # an earlier experiment comes back whole, from the cache, without running anything
    repo.dvc("exp", "apply", "german")
    assert repo.json("metrics/corpus.json")["lang"] == "de"
    assert repo.stages_run(repo.dvc("repro")) == set()
    assert (repo.root / "models/pruned/model.safetensors").exists()

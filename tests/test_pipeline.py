"""End to end on the embedded default (real model, real text), small sizes, in a throwaway git repo."""
import csv
import json
import math

import pytest
import yaml
from transformers import AutoConfig

from layerprune.files import read_jsonl
from layerprune.params import load_params
from pipeline_repo import PipelineRepo

pytestmark = pytest.mark.slow

# model-source and heal-corpus-source run on every repro (always_changed, about a second) to see whether the model, or
# the heal corpus's source, changed
ALWAYS = {"model-source", "heal-corpus-source"}
ALL_STAGES = ALWAYS | {"model", "fetch-wiki", "sample", "layer-similarity", "choose-range", "frontier", "mergekit-slice",
                       "heal-corpus", "heal", "perplexity-base", "perplexity-pruned", "perplexity-healed", "release"}
AFTER_THE_CHOICE = {"mergekit-slice", "heal", "perplexity-pruned", "perplexity-healed", "release"}


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


def test_release_folder_is_the_healed_model_with_its_card(repo):
    """One folder to upload: the healed weights (hardlinked, not copied), tokenizer, mergekit config and the card
    that carries every number; the git-tracked copy of the card is the same text."""
    release, healed = repo.root / "models/release", repo.root / "models/healed"
    assert (release / "model.safetensors").stat().st_ino == (healed / "model.safetensors").stat().st_ino
    assert {"config.json", "tokenizer.json", "mergekit_config.yml", "README.md", "similarity_heatmap.png"} <= {
        file.name for file in release.iterdir()}
    card = (release / "README.md").read_text()
    assert card == (repo.root / "reports/model_card.md").read_text()
    perplexity = {model: repo.json(f"metrics/perplexity_{model}.json") for model in ("base", "pruned", "healed")}
    for values in perplexity.values():
        assert f"{values['word_perplexity']:.4g}" in card
    assert (release / "mergekit_config.yml").read_text() == (repo.root / "models/slice.yaml").read_text()
    assert repo.json("metrics/heal.json")["tokens"] == 512
    rows = {row["model"] for row in csv.DictReader((repo.root / "plots/perplexity.csv").open())}
    assert rows == {"base", "pruned", "healed"}


def test_pruned_perplexity_is_finite_and_above_the_base(repo):
    base, pruned = repo.json("metrics/perplexity_base.json"), repo.json("metrics/perplexity_pruned.json")
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(base[metric]) and math.isfinite(pruned[metric])
        assert pruned[metric] > base[metric]
        change = repo.json("metrics/release.json")["pruned_vs_base"][metric]
        assert change == pytest.approx(pruned[metric] / base[metric] - 1, rel=2e-3)  # both at 4 significant digits
    assert pruned["parameters"] == repo.json("metrics/choice.json")["parameters_after"]


def test_second_repro_runs_nothing_and_changes_nothing(repo):
    assert repo.stages_run(repo.dvc("repro")) == ALWAYS
    assert repo.git("status", "--porcelain").stdout == ""


@pytest.mark.parametrize("module, expected", [
    ("layerprune/card.py", {"release"}),  # card text: never slicing or evaluation again
    ("layerprune/forward.py", {"layer-similarity", "choose-range", "frontier"}),  # padding: never the slice or heal
    ("layerprune/perplexity.py", {"perplexity-base", "perplexity-pruned", "perplexity-healed", "frontier", "release"}),
])
def test_a_code_change_marks_exactly_the_stages_that_run_it(repo, module, expected):
    repo.reset()
    with open(repo.root / module, "a") as f:
        f.write("\n# edited\n")
    changed = set(json.loads(repo.dvc("status", "--json").stdout)) - ALWAYS
    assert changed == expected


# lang=de, the change that reruns the most, is test_experiments_compare_across_languages's experiment
@pytest.mark.parametrize("change, must, may", [
    # The held-out set does not depend on the calibration count, so the base model is not evaluated again. The
    # stages after the choice may run: they do where their inputs changed (a slice of the same layers is the same
    # file, so what depends only on it does not run).
    ("sample.calibration=10", ALWAYS | {"sample", "layer-similarity", "choose-range", "frontier"}, AFTER_THE_CHOICE),
    # a new cut does not redo the heal corpus: it depends on the tokenizer and the texts, not on the weights
    ("prune.layers=3", ALWAYS | {"choose-range"} | AFTER_THE_CHOICE, set()),
    # how the heal runs is not what it computes: a finished heal stays
    ("heal_launch.save_every=3", ALWAYS, set()),
])
def test_a_change_reruns_only_the_affected_stages(repo, change, must, may):
    repo.reset()
    ran = repo.stages_run(repo.dvc("exp", "run", "-S", change))
    assert must <= ran <= must | may
    # the same setting again: nothing executes but model-source (up to date, or restored from the run cache)
    assert repo.stages_run(repo.dvc("exp", "run", "-S", change)) == ALWAYS


def test_frontier_params_mark_only_the_frontier(repo):
    """The frontier is a side branch: no stage reads what it writes, so a change of its params reruns it alone.
    (`dvc status` names the stages whose own inputs changed; with no stage after it, that is all `dvc repro` runs.)"""
    repo.reset()
    stages = yaml.safe_load((repo.root / "dvc.yaml").read_text())["stages"]
    frontier_outputs = {next(iter(entry)) for key in ("outs", "metrics") for entry in stages["frontier"][key]}
    assert not any(frontier_outputs & set(stage.get("deps", [])) for stage in stages.values())
    params = yaml.safe_load((repo.root / "params.yaml").read_text())
    params["frontier"]["layers"] = [3]
    (repo.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(repo.dvc("status", "--json").stdout)) - ALWAYS == {"frontier"}


def test_experiments_compare_across_languages(repo):
    repo.reset()
    ran = repo.stages_run(repo.dvc("exp", "run", "-n", "german", "-S", "lang=de"))
    assert ran == ALL_STAGES - {"model"}  # the same model: everything after it, and only that
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
    assert repo.stages_run(repo.dvc("repro")) == ALWAYS
    assert (repo.root / "models/release/model.safetensors").exists()


@pytest.fixture(scope="module")
def unhealed(repo):
    """The committed run again with heal.tokens=0: heal links the pruned weights in as the healed ones, and
    perplexity-healed and release run on them. The DVC cache is read before and after."""
    repo.reset()
    before = {"objects": repo.cache_objects(), "healed": repo.json("metrics/perplexity_healed.json")}
    run = repo.dvc("exp", "run", "-S", "heal.tokens=0")
    return {"before": before, "run": run, "objects": repo.cache_objects()}


def test_no_stage_writes_into_the_cache(unhealed):
    """Outputs are hard links to their cache objects (.dvc/config), so a stage that opened an existing file for
    writing, instead of writing a new one and renaming it, would change the cache's copy. Every object still hashes
    to its name after every run this module made, and after a rerun of heal, perplexity-healed and release."""
    for objects in (unhealed["before"]["objects"], unhealed["objects"]):
        assert objects and {name: md5 for name, md5 in objects.items() if md5 != name} == {}


def test_without_healing_the_healed_numbers_are_the_pruned_ones_unmeasured(repo, unhealed):
    """heal.tokens=0: the healed weights are the pruned ones, so perplexity-healed copies the pruned stage's files
    and does not run lm-eval again (the same numbers alone would not show that: lm-eval on the same weights repeats)."""
    run = unhealed["run"]
    assert repo.stages_run(run) == ALWAYS | {"heal", "perplexity-healed", "release"}
    assert "lm-eval not run" in run.stdout
    assert repo.json("logs/perplexity_healed.timing.json")["seconds"] == 0
    for pruned, healed in (("metrics/perplexity_pruned.json", "metrics/perplexity_healed.json"),
                           ("results/lm_eval_pruned.json", "results/lm_eval_healed.json")):
        assert (repo.root / healed).read_bytes() == (repo.root / pruned).read_bytes()
    # a heal that trained is measured: the committed run's healed numbers are its own
    assert unhealed["before"]["healed"] != repo.json("metrics/perplexity_pruned.json")
    # and the release reports the pruned model as the one released
    assert "healed_vs_base" not in repo.json("metrics/release.json")
    assert "none: the weights are the pruned model's" in (repo.root / "reports/model_card.md").read_text()

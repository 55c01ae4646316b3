"""No work twice, in-process and in seconds: `perplexity-healed` copies the pruned stage's files when the heal trained
nothing, and measures otherwise; the DVC cache check of the pipeline tests sees a file written in place.
End to end, on the real pipeline: test_pipeline.py's test_no_stage_writes_into_the_cache and
test_without_healing_the_healed_numbers_are_the_pruned_ones_unmeasured."""
import hashlib
import json

import pytest
import yaml
from test_frontier_stage import load_stage

from conftest import REPO
from layerprune.params import parse_params
from pipeline_repo import PipelineRepo

PARAMS = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))


class Measured(Exception):
    """lm-eval was asked to run."""


def evaluate(*args, **kwargs):
    raise Measured


def healed_perplexity(tmp_path, monkeypatch, tokens):
    """Run the stage as `perplexity-healed` with a heal that trained `tokens`, lm-eval replaced by `evaluate`."""
    monkeypatch.chdir(tmp_path)
    stage = load_stage("perplexity")
    monkeypatch.setattr(stage, "evaluate_perplexity", evaluate)
    (tmp_path / "heal.json").write_text(json.dumps({"tokens": tokens}))
    # as the pruned stage wrote them: their bytes must come through, not a re-serialisation
    (tmp_path / "perplexity_pruned.json").write_text('{\n  "word_perplexity": 101.0,\n  "layers": 6\n}\n')
    (tmp_path / "lm_eval_pruned.json").write_text('{"wikitext_es": {"word_perplexity,none": 101.0}}\n')
    stage.main(PARAMS, model_info="base.json", eval_texts="eval.jsonl", metrics="perplexity_healed.json",
               results="lm_eval_healed.json", model_dir="healed", heal_metrics="heal.json",
               pruned_metrics="perplexity_pruned.json", pruned_results="lm_eval_pruned.json")


def test_an_unhealed_model_gets_the_pruned_numbers_without_lm_eval(tmp_path, monkeypatch, capsys):
    healed_perplexity(tmp_path, monkeypatch, tokens=0)
    for pruned, healed in (("perplexity_pruned.json", "perplexity_healed.json"),
                           ("lm_eval_pruned.json", "lm_eval_healed.json")):
        assert (tmp_path / healed).read_bytes() == (tmp_path / pruned).read_bytes()
    assert "lm-eval not run" in capsys.readouterr().out
    assert json.loads((tmp_path / "logs/perplexity_healed.timing.json").read_text())["seconds"] == 0


def test_a_healed_model_is_measured(tmp_path, monkeypatch):
    with pytest.raises(Measured):
        healed_perplexity(tmp_path, monkeypatch, tokens=512)
    assert not (tmp_path / "perplexity_healed.json").exists()


def test_cache_check_sees_an_object_written_in_place(tmp_path):
    weights, listing = b"weights", b'[{"md5": "...", "relpath": "model.safetensors"}]'
    for content, suffix in ((weights, ""), (listing, ".dir")):
        md5 = hashlib.md5(content).hexdigest()
        (tmp_path / ".dvc/cache/files/md5" / md5[:2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / ".dvc/cache/files/md5" / md5[:2] / (md5[2:] + suffix)).write_bytes(content)
    repo = PipelineRepo(tmp_path)
    objects = repo.cache_objects()
    assert len(objects) == 2 and all(name == md5 for name, md5 in objects.items())
    name = hashlib.md5(weights).hexdigest()
    with open(tmp_path / ".dvc/cache/files/md5" / name[:2] / name[2:], "ab") as f:  # what a linked output's writer does
        f.write(b" healed")
    assert repo.cache_objects()[name] != name

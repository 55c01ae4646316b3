import pytest
import yaml

from layerprune.errors import UserError
from layerprune.params import load_params, parse_params
from conftest import REPO


def default():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.model.id.startswith("bundled:")


@pytest.mark.parametrize("key, value, expect", [
    ("sample.calibration", 0, "sample.calibration=0"),
    ("sample.calibration", "many", "sample.calibration='many'"),
    ("similarity.batch_size", -1, "similarity.batch_size=-1"),
    ("similarity.max_length", 0, "similarity.max_length=0"),
    ("eval.max_length", 0, "eval.max_length=0"),
    ("similarity.metric", "cosine", "angular_last"),
    ("data.source", "web", "'bundled' or 'hub'"),
    ("model.id", "bundled:gpt5", "bundled:gemma3-270m"),
    ("prune.fraction", 1.5, "prune.fraction=1.5"),
    ("prune.layers", 0, "prune.layers=0: must be at least 1"),
    ("lang", 42, "lang=42"),
])
def test_bad_value_is_one_line_naming_key(key, value, expect):
    raw = default()
    section, _, name = key.rpartition(".")
    (raw[section] if section else raw)[name] = value
    with pytest.raises(UserError) as err:
        parse_params(raw)
    message = str(err.value)
    assert "\n" not in message
    assert expect in message


def test_both_or_neither_block_size_is_an_error():
    raw = default()
    raw["prune"]["fraction"] = 0.5
    with pytest.raises(UserError, match="exactly one of prune.layers and prune.fraction"):
        parse_params(raw)
    raw["prune"]["fraction"] = raw["prune"]["layers"] = None
    with pytest.raises(UserError, match="exactly one"):
        parse_params(raw)


def test_unknown_key_is_rejected():
    raw = default()
    raw["sample"]["calibraton"] = 5
    with pytest.raises(UserError, match="sample.calibraton"):
        parse_params(raw)


def test_yaml_norwegian_no_still_means_norwegian(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("lang: es", "lang: no")
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").lang == "no"


def test_unreadable_params_file_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("lang: [es\n")
    with pytest.raises(UserError, match="cannot read"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(UserError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")


def test_missing_key_is_named():
    raw = default()
    del raw["sample"]["calibration"]
    with pytest.raises(UserError, match=r"sample.calibration is missing$"):
        parse_params(raw)

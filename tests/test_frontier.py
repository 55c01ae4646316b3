"""The frontier's pure parts, its params, and lm-eval on a model with layers removed in memory."""
import json

import numpy as np
import pytest
import torch
from layerprune.tiny_models import tiny_llama
from transformers import PreTrainedTokenizerFast

from layerprune.errors import UserError
from layerprune.frontier import check_sizes, columns, frontier_rows, per_column, rank_correlations
from layerprune.params import load_params, parse_params
from layerprune.perplexity import evaluate_perplexity
from layerprune.ranges import kept_ranges, passthrough_config
from layerprune.search import without_layers
from layerprune.slicing import slice_model
from layerprune.strategies import STRATEGIES, Strategy


def test_rank_correlations():
    scores = np.full((5, 6), np.nan)
    scores[2, :5] = [0.1, 0.4, 0.2, 0.3, 9.0]
    losses = {0: 3.0, 1: 6.0, 2: 4.0, 3: 5.0}  # the same order as the distances of starts 0..3
    both = {"a": scores, "b": -scores}
    assert rank_correlations(both, losses, 2) == {"a": 1.0, "b": -1.0}
    # one swapped pair of four: 1 - 6 * (1 + 1) / (4 * 15) = 0.8
    assert rank_correlations({"a": scores}, {**losses, 2: 5.5}, 2) == {"a": 0.8}


COLUMNS = ["angular_last", "angular_mean", "block_influence", "deepest", "loss", "iterative"]  # dvc.yaml's plot lines


def test_frontier_rows_one_column_per_frontier_line():
    assert list(columns()) == COLUMNS and columns()["angular_mean"] == ("similarity", "angular_mean")
    picks = {(s, n): (n, s) for s in COLUMNS for n in (2, 4)}  # any hashable stands for a dropped set
    values = {dropped: 1.0 + dropped[0] / 10 + COLUMNS.index(dropped[1]) for dropped in picks.values()}
    rows = frontier_rows(picks, values, base_bits_per_byte=0.9)
    assert [row["layers_removed"] for row in rows] == [0, 2, 4]
    assert list(rows[0]) == ["layers_removed", *COLUMNS] and set(rows[0].values()) == {0, 0.9}
    assert rows[2]["loss"] == 1.4 + COLUMNS.index("loss")
    assert per_column(picks, len)["4"] == {s: 2 for s in COLUMNS}


def test_a_new_strategy_is_a_new_frontier_line(monkeypatch):
    """One entry in the registry is all the frontier needs; a second per-metric strategy would need other names."""
    monkeypatch.setitem(STRATEGIES, "random", Strategy(pick=None, score_name="none", why="chance"))
    assert list(columns()) == [*COLUMNS, "random"] and columns()["random"] == ("random", None)
    monkeypatch.setitem(STRATEGIES, "twin", Strategy(pick=None, score_name="x", why="y", per_metric=True))
    with pytest.raises(ValueError, match="two frontier lines named 'angular_last'"):
        columns()


@pytest.mark.parametrize("sizes, message", [
    ([2, 18], r"^frontier.layers=\[2, 18\]: 18 would drop 18 of the model's 18 layers"),
    ([17], r"^frontier.layers=\[17\]: prune.keep_first=1, prune.keep_last=1: leave 16 droppable layers of 18, "
           "too few for a block of 17$"),
])
def test_sizes_out_of_range(sizes, message):
    with pytest.raises(UserError, match=message) as err:
        check_sizes(sizes, 18, keep_first=1, keep_last=1)
    assert "\n" not in str(err.value)
    check_sizes([1, 16, 17], 18, keep_first=0, keep_last=0)


def _raw():
    return load_params().model_dump()


@pytest.mark.parametrize("section, key, value, message", [
    ("frontier", "layers", [], "frontier.layers=[]: list at least one number of layers to remove"),
    ("frontier", "layers", [2, 0], "frontier.layers=[2, 0]: every number of layers to remove must be at least 1"),
    ("prune", "strategy", "greedy", "prune.strategy='greedy': Input should be 'similarity', 'deepest', 'loss' or "
                                    "'iterative'"),
    ("prune", "search_texts", 0, "prune.search_texts=0: Input should be greater than 0"),
])
def test_bad_params_are_one_line(section, key, value, message):
    raw = _raw()
    raw[section][key] = value
    with pytest.raises(UserError) as err:
        parse_params(raw)
    assert str(err.value) == f"params.yaml: {message}"


def test_frontier_layers_are_sorted_once():
    raw = _raw()
    raw["frontier"]["layers"] = [4, 2, 4]
    assert parse_params(raw).frontier.layers == [2, 4]


def save_word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="w1")
    tokenizer.save_pretrained(path)
    return tokenizer


def test_lm_eval_in_memory_equals_the_sliced_folder(tmp_path, monkeypatch):
    """The frontier scores models with layers removed in place; the perplexity stage scores mergekit's folder."""
    monkeypatch.chdir(tmp_path)
    model = tiny_llama(num_layers=6)
    model.save_pretrained(tmp_path / "base")
    tokenizer = save_word_tokenizer(tmp_path / "base")
    dropped = (1, 3, 4)
    slice_model(passthrough_config(str(tmp_path / "base"), kept_ranges(6, dropped), "float32"), tmp_path / "sliced",
                progress=False)
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(2, 100, (n,), generator=generator)) for n in (40, 25, 70)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kwargs = dict(max_length=32, batch_size=2, device="cpu")  # windows shorter than the texts
    folder = evaluate_perplexity(tmp_path / "sliced", tmp_path / "eval.jsonl", work_dir=tmp_path / "a", **kwargs)
    with without_layers(model, dropped):
        in_memory = evaluate_perplexity(model, tmp_path / "eval.jsonl", work_dir=tmp_path / "b", tokenizer=tokenizer,
                                        **kwargs)
    whole = evaluate_perplexity(model, tmp_path / "eval.jsonl", work_dir=tmp_path / "c", tokenizer=tokenizer, **kwargs)
    assert in_memory["num_tokens"] == folder["num_tokens"] == whole["num_tokens"]
    assert in_memory["bits_per_byte"] == pytest.approx(folder["bits_per_byte"], rel=1e-6)
    assert abs(whole["bits_per_byte"] - folder["bits_per_byte"]) > 1e-3  # the dropped layers matter

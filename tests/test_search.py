"""The loss searches on tiny random models: a candidate scored with the shared prefix must cost exactly what the
whole pruned model costs, in memory and as mergekit's slice on disk."""
import copy
import json
import shutil

import pytest
import torch
import yaml
from layerprune.tiny_models import ALL_LAYOUTS, VOCAB, tiny_gemma3, tiny_llama
from transformers import AutoModelForCausalLM

from layerprune.errors import UserError
from layerprune.ranges import kept_ranges, passthrough_config
from layerprune.search import LossSearch, without_layers
from layerprune.slicing import slice_model
from layerprune.strategies import Block, Problem, loss_by_start, pick_iterative, pick_loss

NUM_LAYERS = 6


def _texts(seed=0, lengths=(12, 9, 5, 12, 2)):
    """Token ids of unequal lengths (padding matters), longer than Gemma 3's sliding window of 4."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def removed_by_hand(model, dropped):
    """The reference: a copy of the model with the layers deleted, as mergekit's slice would have it."""
    model = copy.deepcopy(model)
    owner = model.transformer if hasattr(model, "transformer") else model.model
    name = "h" if hasattr(model, "transformer") else "layers"
    kept = [i for i in range(len(getattr(owner, name))) if i not in set(dropped)]
    setattr(owner, name, torch.nn.ModuleList(getattr(owner, name)[i] for i in kept))
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    return model


def mean_nll(model, texts):
    """Mean next-token NLL, one text at a time (no padding, no batching: independent of LossSearch's passes)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in texts:
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    return total / count


@pytest.mark.parametrize("layout", sorted(ALL_LAYOUTS))
def test_shared_prefix_equals_the_whole_pruned_model(layout):
    model = ALL_LAYOUTS[layout](num_layers=NUM_LAYERS)
    texts = _texts()
    search = LossSearch(model, texts, batch_size=2, progress=False)
    # blocks at the first layer (no prefix), in the middle, and at the last (no layer after it)
    blocks = [tuple(Block(start, 2)) for start in range(NUM_LAYERS - 1)]
    losses = search.block_losses((), blocks)
    whole = mean_nll(model, texts)
    for block, value in zip(blocks, losses):
        reference = mean_nll(removed_by_hand(model, block), texts)
        assert abs(value - reference) < 1e-5, (block, value, reference)
        assert abs(reference - whole) > 1e-3  # the block matters, so the comparison means something
    # on top of layers already removed (the iterative search's case): one pass of the pruned model is the prefix
    for block, value in zip([(0,), (2,), (4, 5)], search.block_losses({1, 3}, [(0,), (2,), (4, 5)])):
        assert abs(value - mean_nll(removed_by_hand(model, {1, 3, *block}), texts)) < 1e-5
    torch.testing.assert_close(search.full_loss((2, 3)), losses[2], rtol=0, atol=1e-5)


def test_without_layers_restores_the_model():
    model = tiny_gemma3(num_layers=NUM_LAYERS)
    ids = torch.tensor([_texts()[0]])
    with torch.no_grad():
        before = model(ids).logits
        with without_layers(model, {1, 4}) as pruned:
            assert pruned.config.num_hidden_layers == 4
            assert pruned.config.layer_types == [tiny_gemma3().config.layer_types[i] for i in (0, 2, 3, 5)]
            pruned(ids)  # with the KV cache on, as lm-eval calls it: layer indices must fit the shorter cache
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert model.config.num_hidden_layers == NUM_LAYERS and len(model.config.layer_types) == NUM_LAYERS


@pytest.mark.parametrize("dropped", [(1, 2), (1, 4), (0, 2, 3)])
def test_mergekit_slice_of_any_layer_set_equals_removal_in_memory(dropped, tmp_path):
    """One mergekit slice per kept range; Gemma 3's per-layer sliding/full types follow the kept layers."""
    model = tiny_gemma3(num_layers=NUM_LAYERS)
    model.save_pretrained(tmp_path / "base")
    ranges = kept_ranges(NUM_LAYERS, dropped)
    config = passthrough_config(str(tmp_path / "base"), ranges, "float32")
    assert len(config.slices) == len(ranges)
    slice_model(config, tmp_path / "out", progress=False)
    sliced = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    kept = [i for i in range(NUM_LAYERS) if i not in dropped]
    assert sliced.config.layer_types == [model.config.layer_types[i] for i in kept]
    texts = _texts()
    with without_layers(model, dropped):
        in_memory = mean_nll(model, texts)
    assert abs(mean_nll(sliced, texts) - in_memory) < 1e-5
    if dropped == (1, 2):  # and the loss search's candidate, scored with its shared prefix
        (candidate,) = LossSearch(model, texts, batch_size=2, progress=False).block_losses((), [dropped])
        assert abs(candidate - mean_nll(sliced, texts)) < 1e-5


def _with_planted_identities(layers_to_plant):
    """A tiny Llama whose planted layers add ~nothing to the residual stream (their output projections scaled to
    ~0), and texts it predicts well (its own greedy continuations), so that removing any other layer costs loss."""
    model = tiny_llama(num_layers=NUM_LAYERS, seed=1)
    with torch.no_grad():
        model.lm_head.weight *= 30  # peaked predictions: its own continuations are far from chance
        for i in layers_to_plant:
            model.model.layers[i].self_attn.o_proj.weight *= 1e-4
            model.model.layers[i].mlp.down_proj.weight *= 1e-4
        texts = []
        for prompt in _texts(seed=2, lengths=(3, 3, 3, 3)):
            ids = list(prompt)
            while len(ids) < 16:
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            texts.append(ids)
    return model, texts


def _problem(search, size, keep_first=0, keep_last=1):
    return Problem(search.num_layers, size, keep_first, keep_last, None, None, make_search=lambda: search)


def test_iterative_finds_planted_identity_layers():
    planted = {1, 3}
    model, texts = _with_planted_identities(planted)
    search = LossSearch(model, texts, batch_size=2, progress=False)
    base = mean_nll(model, texts)
    # the premise: removing a planted layer is ~free, removing any other costs
    singles = dict(zip(range(5), search.block_losses((), [(i,) for i in range(5)])))
    assert all(abs(singles[i] - base) < 1e-3 for i in planted)
    assert all(singles[i] > base + 0.05 for i in set(range(5)) - planted)

    pick = pick_iterative(_problem(search, 2))
    assert set(pick.dropped) == planted  # not consecutive: no block of 2 could drop both
    assert abs(pick.score - base) < 1e-3
    step = {number: {row["start"]: row["loss"] for row in pick.candidates if row["step"] == number} for number in (1, 2)}
    first = min(step[1], key=step[1].get)
    assert step[1] == singles and set(step[2]) == set(range(5)) - {first}
    assert step[2][(planted - {first}).pop()] == pick.score
    # the contiguous search at n=1 sees the same losses; at n=2 it cannot reach the planted pair
    one = pick_loss(_problem(search, 1))
    assert one.dropped[0] in planted and loss_by_start(_problem(search, 1)) == singles
    assert pick_loss(_problem(search, 2)).score > pick.score


def test_flops_count_the_layers_each_candidate_runs():
    model = tiny_llama(num_layers=NUM_LAYERS)
    texts = _texts()
    tokens = sum(map(len, texts))
    per_layer = 2 * sum(p.numel() for name, p in model.model.layers[0].named_parameters() if "norm" not in name)
    search = LossSearch(model, texts, batch_size=2, progress=False)
    search.block_losses((), [tuple(Block(start, 2)) for start in range(4)])  # starts 0..3 of 6 layers
    # prefix: layers 0..2 once; candidates run the layers after their block: 4 + 3 + 2 + 1
    assert search.flops == (3 + 10) * tokens * per_layer
    search.flops = 0
    search.block_losses((), [(0, 1)])  # memoised: nothing runs
    assert search.flops == 0
    search.full_loss((0, 1))
    assert search.flops == 4 * tokens * per_layer


def test_no_room_is_one_line_naming_the_keys():
    search = LossSearch(tiny_llama(num_layers=NUM_LAYERS), _texts(), batch_size=2, progress=False)
    for strategy in (pick_loss, pick_iterative):
        with pytest.raises(UserError, match=r"^prune.keep_first=2, prune.keep_last=1: leave 3 droppable") as err:
            strategy(_problem(search, 4, keep_first=2, keep_last=1))
        assert "\n" not in str(err.value)


def _stage_workspace(tmp_path, strategy, layers=2):
    """A workspace for stages/choose_range.py: the planted tiny Llama with a word tokenizer, its texts as words."""
    from test_errors import write_distances, write_model_info, write_params
    from test_frontier import save_word_tokenizer

    model, texts = _with_planted_identities({1, 3})
    model.save_pretrained(tmp_path / "base")
    save_word_tokenizer(tmp_path / "base")
    (tmp_path / "calibration.jsonl").write_text("".join(
        json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n" for ids in texts))
    write_model_info(tmp_path / "base.json", NUM_LAYERS, architecture="LlamaForCausalLM", local_dir=tmp_path / "base")
    write_distances(tmp_path / "distances.csv", NUM_LAYERS)
    return write_params(tmp_path / "params.yaml", {"prune.strategy": strategy, "prune.layers": layers,
                                                    "prune.search_texts": len(texts), "slice.dtype": "float32"})


def _choose_range(tmp_path, params):
    from test_errors import stage

    return stage("choose_range.py", params, "--model-info", "base.json", "--distances", "distances.csv",
                 "--calibration", "calibration.jsonl", "--merge-config", "slice.yaml", "--metrics", "choice.json",
                 "--heatmap", "h.png", "--curve", "c.csv", "--block-losses", "losses.csv", cwd=tmp_path)


def test_choose_range_iterative_drops_layers_that_are_not_consecutive(tmp_path):
    result = _choose_range(tmp_path, _stage_workspace(tmp_path, "iterative"))
    assert result.returncode == 0, result.stderr
    choice = json.loads((tmp_path / "choice.json").read_text())
    assert choice["dropped"] == [1, 3] and choice["dropped_layers"] == "1, 3" and "start" not in choice
    assert choice["kept_ranges"] == "[0,1] + [2,3] + [4,6]" and choice["layers_kept"] == 4
    assert choice["score_name"] == "calibration loss" and choice["score"] > 0
    slices = yaml.safe_load((tmp_path / "slice.yaml").read_text())["slices"]
    assert [s["sources"][0]["layer_range"] for s in slices] == [[0, 1], [2, 3], [4, 6]]
    rows = (tmp_path / "losses.csv").read_text().splitlines()
    assert rows[0] == "step,start,dropped,loss" and len(rows) == 1 + 5 + 4  # every candidate of both steps


def test_choose_range_similarity_never_loads_the_model(tmp_path):
    params = _stage_workspace(tmp_path, "similarity")
    shutil.rmtree(tmp_path / "base")  # a strategy that needed the weights would fail now
    (tmp_path / "base").mkdir()
    (tmp_path / "calibration.jsonl").unlink()
    result = _choose_range(tmp_path, params)
    assert result.returncode == 0, result.stderr
    choice = json.loads((tmp_path / "choice.json").read_text())
    assert choice["dropped"] == [0, 1] and choice["start"] == 0 and choice["score_name"] == "angular_last distance"
    assert (tmp_path / "losses.csv").read_text() == "step,start,dropped,loss\n"

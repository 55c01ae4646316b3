"""What a pass costs, said before it runs: FLOPs from shapes alone (checked against torch's own FLOP counter), then
the time at the first batch's rate."""
import re

import pytest
import torch
from layerprune.tiny_models import VOCAB, tiny_llama
from torch.utils.flop_counter import FlopCounterMode

from layerprune.cost import Cost, duration, forward_flops
from layerprune.forward import without_head
from layerprune.similarity import layer_distances

pytestmark = pytest.mark.usefixtures("one_thread")


def counted(model, ids: torch.Tensor, head: bool) -> int:
    """FLOPs torch counts for one pass (matmuls; attention as if not causal, which only adds a few % at 6 tokens)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        (model if head else without_head(model))(input_ids=ids)
    return counter.get_total_flops()


@pytest.mark.parametrize("head", [False, True])
def test_forward_flops_match_torchs_count(head):
    model = tiny_llama(num_layers=4)
    ids = torch.randint(3, VOCAB, (3, 6))
    assert forward_flops(model, [6, 6, 6], head=head) == pytest.approx(counted(model, ids, head), rel=0.05)


def test_the_similarity_pass_says_its_cost_before_and_after_its_first_batch(capsys):
    model = tiny_llama(num_layers=4)
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, VOCAB, (6,), generator=generator).tolist() for _ in range(4)]
    layer_distances(model, ids, batch_size=2, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("layer distances: ")
             and "%" not in line]
    assert len(lines) == 2, lines
    total = float(re.fullmatch(r"layer distances: ([\d.e+-]+) TFLOP", lines[0]).group(1)) * 1e12
    assert total == pytest.approx(counted(model, torch.tensor(ids), head=False), rel=0.05)
    assert re.fullmatch(r"layer distances: first batch at [\d.e+-]+ GFLOP/s; all of it takes about \d+ s", lines[1])


def test_the_estimate_is_said_once_at_the_first_batchs_rate(capsys):
    cost = Cost("a pass", 6e12)
    cost.first_batch(2e9, 1.0)  # 2 GFLOP/s: 3000 s for the whole
    cost.first_batch(1e9, 1.0)  # later batches say nothing
    assert capsys.readouterr().err.splitlines() == [
        "a pass: 6 TFLOP", "a pass: first batch at 2 GFLOP/s; all of it takes about 50 min"]
    assert Cost("quiet", 1.0, quiet=True) and capsys.readouterr().err == ""
    assert [duration(s) for s in (5, 89, 90 * 60, 3 * 3600)] == ["5 s", "89 s", "1.5 h", "3.0 h"]

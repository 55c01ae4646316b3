"""A similarity pass that survives a kill: its sums are saved as it goes, and a rerun of the same work resumes from
them with the matrix of an unbroken pass, to the last bit; a checkpoint of other work is never resumed.

Run as a script (`python tests/test_similarity_checkpoint.py FOLDER`), this file is the process that the first test
kills."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from layerprune.layers import decoder_layers
from layerprune.similarity import layer_distances
from layerprune.tiny_models import VOCAB, tiny_llama

NUM_TEXTS = 40
KEY = "tiny-llama@seed0"


def work(seed=5):
    """The tiny model and the texts every process here scores: the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (NUM_TEXTS,), generator=generator).tolist()
    return tiny_llama(num_layers=8), [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def assert_bit_equal(got, expected):
    assert (got.num_samples, got.num_tokens) == (expected.num_samples, expected.num_tokens)
    for name in ("angular_last", "angular_mean", "block_influence"):
        assert np.array_equal(getattr(got, name), getattr(expected, name), equal_nan=True), name  # NaN: no block


@pytest.fixture
def model_and_texts(one_thread):
    return work()


def test_a_killed_pass_resumes_with_the_same_bits(tmp_path, model_and_texts, capsys):
    """A process killed (SIGKILL: no cleanup, no flush) after a few batches; this process resumes from what its atomic
    saves left and must end with the matrices of an unbroken pass, bit for bit."""
    folder = tmp_path / "checkpoints"
    # one thread, as here: each batch's float32 sums are the same in both processes
    killed = subprocess.Popen([sys.executable, __file__, folder], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint, deadline, done = folder / "sums.rank0.pt", time.monotonic() + 60, 0
    while done < 3 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
        if checkpoint.exists():
            done = torch.load(checkpoint, weights_only=True)["batches"]
    killed.kill()
    assert killed.wait() == -signal.SIGKILL, killed.communicate()  # killed midway, not finished or failed before
    model, token_ids = model_and_texts
    capsys.readouterr()
    resumed = layer_distances(model, token_ids, batch_size=1, checkpoints=folder, model_key=KEY, progress=False)
    started = int(re.fullmatch(r"resuming layer distances at batch (\d+) of 40\n", capsys.readouterr().out).group(1))
    assert 3 <= started < 40
    assert list(folder.iterdir()) == []  # the checkpoint is gone after a finished pass; the folder stays
    assert_bit_equal(resumed, layer_distances(model, token_ids, batch_size=1, progress=False))


class Stop(Exception):
    pass


def interrupt(model, token_ids, folder, after: int, checkpoint_seconds=0, **work) -> None:
    """A pass with checkpoints that stops with an exception in its batch after `after` batches."""
    batches_run = 0

    def count(*args):
        nonlocal batches_run
        batches_run += 1
        if batches_run > after:
            raise Stop

    hook = decoder_layers(model)[0].register_forward_pre_hook(count)
    try:
        with pytest.raises(Stop):
            layer_distances(model, token_ids, checkpoints=folder, checkpoint_seconds=checkpoint_seconds, progress=False,
                            **work)
    finally:
        hook.remove()


OTHER_WORK = {
    "texts": {},
    "batch size": {"batch_size": 3},
    "padding side": {"padding_side": "left"},
    "pad id": {"pad_id": 7},
    "model": {"model_key": "tiny-llama@seed1"},
}


@pytest.mark.parametrize("change", ["same work", *OTHER_WORK])
def test_a_checkpoint_is_resumed_only_by_the_same_work(tmp_path, model_and_texts, capsys, change):
    """Interrupted after 5 batches of 2, then run again: the same work resumes from batch 5, any other starts afresh
    and says so. Either way the result is that of one unbroken pass, bit for bit, and the checkpoint is gone."""
    model, token_ids = model_and_texts
    first = {"batch_size": 2, "padding_side": "right", "pad_id": 0, "model_key": KEY}
    interrupt(model, token_ids, tmp_path, after=5, **first)
    assert [path.name for path in tmp_path.iterdir()] == ["sums.rank0.pt"]
    (tmp_path / "sums.rank1.pt").write_bytes(b"left by a killed run of 2 processes: never read, removed at the end")
    again, texts = {**first, **OTHER_WORK.get(change, {})}, token_ids
    if change == "texts":
        texts = work(seed=6)[1]
    capsys.readouterr()
    got = layer_distances(model, texts, checkpoints=tmp_path, checkpoint_seconds=0, progress=False, **again)
    printed = capsys.readouterr().out
    if change == "same work":
        assert printed == "resuming layer distances at batch 5 of 20\n"
    else:
        assert printed.startswith("layer distances: starting afresh; ") and printed.count("\n") == 1
    assert_bit_equal(got, layer_distances(model, texts, progress=False, **again))
    assert list(tmp_path.iterdir()) == []


def test_saves_wait_for_checkpoint_seconds(tmp_path, model_and_texts):
    """With the default period no save falls in a pass of a second: an interrupted one leaves nothing to resume."""
    model, token_ids = model_and_texts
    interrupt(model, token_ids, tmp_path, after=5, batch_size=2, checkpoint_seconds=30)
    assert list(tmp_path.iterdir()) == []


def main(folder):
    """The pass that the first test kills: saving after every batch, on a model made slow (same numbers) so that the
    test sees the checkpoint grow batch by batch."""
    torch.set_num_threads(1)
    model, token_ids = work()
    decoder_layers(model)[0].register_forward_pre_hook(lambda *args: time.sleep(0.05))
    layer_distances(model, token_ids, batch_size=1, checkpoints=folder, model_key=KEY, checkpoint_seconds=0,
                    progress=False)


if __name__ == "__main__":
    main(sys.argv[1])

"""Guards for heal.py: each test fails on a realistic bug in one behaviour (the checkpoint fingerprint, the resume
point, the KL direction, the rotation of the logit positions, the shuffled training order, and heal_model's wiring
of the teacher, the trained weights and the saved dtype). Expected values are hand-written or computed here with
plain torch, never taken from heal.py."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_heal import heal_params, prepare_shards, run_heal, work, write_jsonl  # noqa: F401 (work: a fixture)
from layerprune.tiny_models import VOCAB, tiny_llama, word_tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

from layerprune.heal import HealTrainer, fingerprint, resume_point, training_data
from layerprune.params import HealParams

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- fingerprint: the bytes of every input file, the params that change the result ----


@pytest.fixture
def inputs(tmp_path):
    """A model folder (with a nested file) and a text file, as heal's fingerprint_inputs."""
    model = tmp_path / "pruned"
    (model / "shards").mkdir(parents=True)
    (model / "config.json").write_text('{"num_hidden_layers": 6}\n')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (model / "shards" / "part-1.bin").write_bytes(bytes(64))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a0", "text": "w3 w4 w5"}\n')
    return [model, corpus]


@pytest.mark.parametrize("edited", ["corpus.jsonl", "pruned/model.safetensors", "pruned/shards/part-1.bin"])
def test_fingerprint_follows_the_bytes_of_every_input_file(inputs, tmp_path, edited):
    heal = heal_params()
    before = fingerprint(heal, inputs)
    path = tmp_path / edited
    os.utime(path, (1, 1))  # a touched file with the same bytes is the same input
    assert fingerprint(heal, inputs) == before
    original = path.read_bytes()
    path.write_bytes(bytes([original[0] ^ 1]) + original[1:])  # same name, same size, one bit different
    assert fingerprint(heal, inputs) != before
    path.write_bytes(original)
    assert fingerprint(heal, inputs) == before


@pytest.mark.parametrize("change", [
    {"loss": {"lm": 1.0, "kl": 0.5}},
    {"loss": {"lm": 1.0, "kl": 1.0, "hidden": 0.5}},
    {"learning_rate": 2e-3},
    {"seq_len": 32},
    {"seed": 1},
    {"head_every": 2},
    {"trainable": "all"},
], ids=["loss.kl", "loss.hidden", "learning_rate", "seq_len", "seed", "head_every", "trainable"])
def test_fingerprint_follows_the_params_that_change_the_result(inputs, change):
    base = {"loss": {"lm": 1.0, "kl": 1.0}, "head_every": 4}
    assert fingerprint(heal_params(**{**base, **change}), inputs) != fingerprint(heal_params(**base), inputs)


def other_value(value):
    """A different value of the same kind: every heal param, whatever its type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if value is None:
        return 4
    if isinstance(value, str):
        return value + "-other"
    return value.model_copy(update={"kl": value.kl + 1})  # the loss weights


@pytest.mark.parametrize("key", sorted(HealParams.model_fields))
def test_fingerprint_follows_every_heal_param(inputs, key):
    """Every heal param can change what a heal computes (or its schedule of evaluations), so a checkpoint made with
    another value must never be resumed. How it runs (heal_launch) is not a heal param."""
    heal = heal_params()
    changed = heal.model_copy(update={key: other_value(getattr(heal, key))})
    assert fingerprint(changed, inputs) != fingerprint(heal, inputs)


def test_fingerprint_follows_the_heal_code(inputs, monkeypatch, tmp_path):
    """A heal made by other code is another heal: the fingerprint hashes heal.py's bytes."""
    import layerprune.heal

    before = fingerprint(heal_params(), inputs)
    edited = tmp_path / "heal.py"
    edited.write_bytes(Path(layerprune.heal.__file__).read_bytes() + b"\n# an edit\n")
    monkeypatch.setattr(layerprune.heal, "__file__", str(edited))
    assert fingerprint(heal_params(), inputs) != before


def test_fingerprint_hashes_each_input_once_and_again_only_when_it_changes(inputs, tmp_path):
    import sys

    hashes = tmp_path / "hashes.json"
    first = fingerprint(heal_params(), inputs, hashes)
    opened = []
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and opened is not None
                     and str(args[0]).startswith(str(tmp_path / "pruned")) else None)
    opened.clear()
    assert fingerprint(heal_params(), inputs, hashes) == first == fingerprint(heal_params(), inputs)
    assert opened == sorted(set(opened)) and len(opened) == 3  # the run without the record read all three files
    opened.clear()
    assert fingerprint(heal_params(), inputs, hashes) == first
    assert opened == []  # a resume reads no weights to know they are the same
    weights = tmp_path / "pruned" / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[:-1] + b"x")  # a new file: another inode and modification time
    assert fingerprint(heal_params(), inputs, hashes) != first
    opened = None  # the audit hook stays installed; it does nothing from here on


# ---- resume_point: the newest complete checkpoint of this fingerprint, by step number ----


def checkpoint(folder, step, complete=True):
    (folder / f"checkpoint-{step}").mkdir()
    (folder / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def test_resume_point_is_the_newest_complete_checkpoint_by_number(tmp_path):
    folder = tmp_path / "checkpoints"
    assert resume_point(folder, "abc") is None  # a new folder: stamped with the fingerprint, nothing to resume
    # As strings "checkpoint-8" is the largest of the complete ones; 200 is newer but has no trainer_state.json.
    for step in (16, 8, 120):
        checkpoint(folder, step)
    checkpoint(folder, 200, complete=False)
    (folder / "dvclive").mkdir()
    assert resume_point(folder, "abc") == str(folder / "checkpoint-120")
    assert {p.name for p in folder.iterdir() if p.is_dir()} == {
        "checkpoint-8", "checkpoint-16", "checkpoint-120", "checkpoint-200", "dvclive"}  # nothing deleted


def test_resume_point_clears_a_foreign_fingerprint(tmp_path):
    folder = tmp_path / "checkpoints"
    resume_point(folder, "abc")
    for step in (8, 16):
        checkpoint(folder, step)
    (folder / "dvclive").mkdir()
    assert resume_point(folder, "xyz") is None
    assert [p for p in folder.iterdir() if p.is_dir()] == []
    checkpoint(folder, 4)
    assert resume_point(folder, "xyz") == str(folder / "checkpoint-4")  # the folder belongs to "xyz" now
    assert resume_point(folder, "abc") is None and not (folder / "checkpoint-4").exists()


# ---- the objective: KL direction and rotating positions, against plain torch ----


def trainer_for(tmp_path, model, heal, teacher=None, step=0):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = HealTrainer(model=model.train(), args=args, heal=heal, teacher=teacher)
    trainer.state.global_step = step
    return trainer


def test_kl_is_teacher_to_student_on_the_rotated_positions(tmp_path):
    student, teacher = tiny_llama(seed=3), tiny_llama(seed=4)
    with torch.no_grad():  # a flat student and a peaked teacher: KL(p||q) and KL(q||p) differ a lot then
        student.lm_head.weight.mul_(3)
        teacher.lm_head.weight.mul_(30)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    trainer = trainer_for(tmp_path, student, heal_params(loss={"kl": 1.0}, head_every=3), teacher.eval(), step=2)
    got = trainer.compute_loss(student, {"input_ids": ids}).item()

    positions = [2, 5, 8]  # step 2 with every 3rd position: 2, 5, 8 (11 has no next token)
    with torch.no_grad():
        log_s = torch.log_softmax(student(input_ids=ids).logits[:, positions].double(), -1)
        log_t = torch.log_softmax(teacher(input_ids=ids).logits[:, positions].double(), -1)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()  # KL(teacher || student), mean over 2 × 3
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1).mean().item()
    assert abs(forward - reverse) > 0.3 * forward  # 2.51 vs 4.00 nats: the direction shows
    assert got == pytest.approx(forward, rel=1e-4)


def test_lm_positions_rotate_with_the_step(tmp_path):
    model = tiny_llama(seed=3)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    trainer = trainer_for(tmp_path, model, heal_params(loss={"lm": 1.0}, head_every=4))
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    # 14 tokens: positions 0..12 have a next token; step s uses those that are s mod 4
    for step, positions in [(0, [0, 4, 8, 12]), (1, [1, 5, 9]), (2, [2, 6, 10]), (3, [3, 7, 11]),
                            (5, [1, 5, 9]), (10, [2, 6, 10])]:
        trainer.state.global_step = step
        got = trainer.compute_loss(model, {"input_ids": ids}).item()
        targets = ids[:, [p + 1 for p in positions]]
        expected = -log_p[:, positions].gather(-1, targets.unsqueeze(-1)).mean().item()
        assert got == pytest.approx(expected, rel=1e-5), f"step {step}"


# ---- the training order: packed blocks in one seeded, shuffled order ----

WORDS = 40  # per article; article k is the words w<3 + 40k> ... w<3 + 40k + 39>, so every token tells where it is


def stream_successor(a: int, b: int, eos: int) -> bool:
    """Whether token b can follow token a in the packed text stream (articles in any order, each closed by EOS)."""
    if a == eos:
        return b != eos and (b - 3) % WORDS == 0  # the first word of some article
    return b == (eos if (a - 3) % WORDS == WORDS - 1 else a + 1)


def shards_of(tmp_path, articles, tokenizer, **changes):
    write_jsonl(tmp_path / "corpus.jsonl", articles)
    write_jsonl(tmp_path / "eval.jsonl", [{"id": "none", "text": "w3"}])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return prepare_shards(tmp_path / "corpus.jsonl", tmp_path / "eval.jsonl", tmp_path / "tokenizer",
                          tmp_path / "shards", **changes)


def rows_of(data) -> list[list[int]]:
    return [data.train[i]["input_ids"].tolist() for i in range(len(data.train))]


def test_training_blocks_come_in_a_seeded_shuffled_order(tmp_path):
    tokenizer = word_tokenizer(3 + 20 * WORDS, bos=True)
    articles = [{"id": f"a{k}", "title": "", "text": " ".join(f"w{3 + WORDS * k + j}" for j in range(WORDS))}
                for k in range(20)]
    shards = shards_of(tmp_path, articles, tokenizer, validation_texts=2, validation_tokens=1)
    # 40 blocks of 8 tokens, from about 100 that the 18 training articles pack into: no repeats needed
    heal = heal_params(tokens=2 * 8 * 20, seq_len=8, batch_size=2, repeat=False)
    data = training_data(heal, shards)
    assert data.steps == 20 and len(data.train) == 40
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    rows = [[t for t in row if t != bos] for row in rows_of(data)]
    assert all(len(row) == 8 for row in rows_of(data))  # BOS + 7 tokens of the stream (texts start with BOS too)
    assert len({tuple(r) for r in rows}) == len(rows)  # 40 different blocks
    for row in rows:  # each block is a piece of the stream
        assert all(stream_successor(a, b, eos) for a, b in zip(row, row[1:])), row
    # In packed order every block would continue the one before it; shuffled, almost none does.
    continued = sum(stream_successor(a[-1], b[0], eos) for a, b in zip(rows, rows[1:]))
    assert continued <= 5
    assert rows_of(training_data(heal, shards)) == rows_of(data)  # the same seed, the same order


def test_the_block_order_follows_heal_seed(tmp_path):
    """Two articles of 160 words (161 tokens with EOS, 23 blocks of BOS + 7): whichever the corpus's seed makes the
    training one, its blocks are numbered by where they start in it, so the orders of two seeds compare directly."""
    tokenizer = word_tokenizer(3 + 2 * 160, bos=True)
    articles = [{"id": f"a{k}", "title": "", "text": " ".join(f"w{3 + 160 * k + j}" for j in range(160))}
                for k in range(2)]
    shards = shards_of(tmp_path, articles, tokenizer, validation_texts=1, validation_tokens=1)
    heal = heal_params(tokens=2 * 8 * 10, seq_len=8, batch_size=2, repeat=False)

    def block_order(seed):
        return [((row[1] - 3) % 160) // 7 for row in rows_of(training_data(heal.model_copy(update={"seed": seed}),
                                                                            shards))]  # row[0] is BOS

    orders = [block_order(seed) for seed in (0, 1, 2)]
    for order in orders:
        assert len(set(order)) == 20 and set(order) <= set(range(23)) and order != sorted(order)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]


# ---- heal_model end to end: the teacher, the matched states, the trained weights, the saved dtype ----

ONE_STEP = dict(tokens=4 * 16, eval_every=100, learning_rate=1e-3)


def record_first_step(monkeypatch) -> list:
    """[(input ids, loss)] of the first training step, as the Trainer computes it."""
    seen, real = [], HealTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        if model.training and not seen:
            seen.append((inputs["input_ids"].clone(), loss.item()))
        return loss

    monkeypatch.setattr(HealTrainer, "compute_loss", recording)
    return seen


def changed(before_dir, after_dir) -> tuple[set[str], set[str]]:
    """(pruned-layer indices with a changed tensor, names of changed tensors outside the decoder layers)."""
    before, after = (load_file(d / "model.safetensors") for d in (before_dir, after_dir))
    assert set(before) == set(after)
    names = {name for name in before if not torch.equal(before[name], after[name])}
    return ({n.split(".")[2] for n in names if n.startswith("model.layers.")},
            {n for n in names if not n.startswith("model.layers.")})


def base_and_pruned(work):
    load = lambda name: AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32).eval()  # noqa: E731
    return load("base"), load("pruned")


def test_heal_with_kl_distils_from_the_base_model(work, tmp_path, monkeypatch):
    seen = record_first_step(monkeypatch)
    result = run_heal(work, tmp_path, heal_params(**ONE_STEP, loss={"kl": 1.0, "lm": 0.0}, head_every=2,
                                                  cut_layers=2))
    ids, loss = seen[0]
    base, pruned = base_and_pruned(work)
    positions = list(range(0, 15, 2))  # step 0, every 2nd of 16 positions with a next token
    with torch.no_grad():
        log_t = torch.log_softmax(base(input_ids=ids).logits[:, positions].double(), -1)
        log_s = torch.log_softmax(pruned(input_ids=ids).logits[:, positions].double(), -1)
    expected = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
    assert expected > 1e-3 and loss == pytest.approx(expected, rel=1e-4)  # 0.0021 nats
    assert result.steps == 1
    # the cut lies between pruned layers 2 and 3: layers 1..4 train, nothing else moves
    assert changed(work / "pruned", tmp_path / "healed") == ({"1", "2", "3", "4"}, set())


def test_heal_with_hidden_matches_the_base_state_above_the_cut(work, tmp_path, monkeypatch):
    seen = record_first_step(monkeypatch)
    result = run_heal(work, tmp_path, heal_params(**ONE_STEP, loss={"hidden": 1.0}, cut_layers=2))
    ids, loss = seen[0]
    base, pruned = base_and_pruned(work)
    with torch.no_grad():
        # pruned layers 1..4 train; the output of pruned layer 4 (hidden_states[5]) is that of base layer 6
        # (hidden_states[7]): pruned layers 0, 1, 2, 3, 4 are base layers 0, 1, 2, 5, 6
        mine = pruned(input_ids=ids, output_hidden_states=True).hidden_states[5].double()
        theirs = base(input_ids=ids, output_hidden_states=True).hidden_states[7].double()
    expected = ((mine - theirs).pow(2).sum(-1) / theirs.pow(2).sum(-1)).mean().item()
    assert expected > 0.1 and loss == pytest.approx(expected, rel=1e-4)  # 0.25
    assert result.train_loss is not None and 0 < result.train_loss < float("inf")
    assert changed(work / "pruned", tmp_path / "healed") == ({"1", "2", "3", "4"}, set())


def test_heal_all_trains_every_decoder_layer_and_nothing_else(work, tmp_path):
    run_heal(work, tmp_path, heal_params(**ONE_STEP, trainable="all"))
    before, after = (load_file(d / "model.safetensors") for d in (work / "pruned", tmp_path / "healed"))
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    # every tensor of the 6 decoder layers; not the embeddings, the final norm or the head
    assert moved == {name for name in before if name.startswith("model.layers.")}


def test_heal_of_a_bf16_model_writes_bf16_and_the_pruned_files(work, tmp_path):
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    AutoModelForCausalLM.from_pretrained(work / "pruned", dtype=torch.bfloat16).save_pretrained(copy / "pruned")
    healed, pruned = tmp_path / "healed", copy / "pruned"
    assert {t.dtype for t in load_file(pruned / "model.safetensors").values()} == {torch.bfloat16}
    run_heal(copy, tmp_path, heal_params(**ONE_STEP, cut_layers=1))
    assert sorted(p.name for p in healed.iterdir()) == sorted(p.name for p in pruned.iterdir())
    for path in pruned.iterdir():
        if path.suffix != ".safetensors":
            assert (healed / path.name).read_bytes() == path.read_bytes(), path.name
    assert {t.dtype for t in load_file(healed / "model.safetensors").values()} == {torch.bfloat16}
    assert changed(pruned, healed) == ({"2", "3"}, set())  # the cut lies between pruned layers 2 and 3

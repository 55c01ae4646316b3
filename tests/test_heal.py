import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from layerprune.tiny_models import VOCAB, tiny_llama
from transformers import AutoModelForCausalLM, TrainingArguments

from layerprune.errors import UserError
from layerprune.heal import (
    HealTrainer, cut_layers, heal_model, matched_states, pack, plan_steps, training_data, validation_size,
)
from layerprune.models import ModelInfo
from layerprune.params import HealParams, parse_params
from layerprune.strategies import Choice

REPO = Path(__file__).resolve().parent.parent
DROPPED = [3, 4]  # of the tiny 8-layer base


pytestmark = pytest.mark.usefixtures("one_thread")


def heal_params(**changes) -> HealParams:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["heal"]
    raw.update(tokens=4 * 16 * 12, seq_len=16, batch_size=4, learning_rate=1e-3, validation_texts=4, eval_every=5,
               save_every=3, loss={"lm": 1.0}, head_every=1, trainable="cut", warmup=0.0)
    raw.update(changes)
    return HealParams.model_validate(raw)


# ---- a tiny base, its pruned copy, a word-level tokenizer and a corpus ----


def number_tokenizer():
    """Text "w5 w6 w7" is tokens [5, 6, 7]; EOS is 1, no BOS: token counts are the word counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def save_tokenizer(folder: Path) -> None:
    number_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """models/base (8 layers), models/pruned (layers 3 and 4 deleted), a corpus of 120 articles, 10 held out."""
    root = tmp_path_factory.mktemp("heal")
    base = tiny_llama(num_layers=8)
    base.save_pretrained(root / "base")
    pruned = tiny_llama(num_layers=8)
    for layer in sorted(DROPPED, reverse=True):
        del pruned.model.layers[layer]
    pruned.config.num_hidden_layers = len(pruned.model.layers)
    pruned.save_pretrained(root / "pruned")
    for folder in ("base", "pruned"):
        save_tokenizer(root / folder)
    rng = random.Random(0)
    words = lambda: " ".join(f"w{rng.randrange(2, 40)}" for _ in range(rng.randrange(20, 80)))  # noqa: E731
    articles = [{"id": f"a{i}", "title": "", "text": words()} for i in range(120)]
    write_jsonl(root / "corpus.jsonl", articles)
    write_jsonl(root / "eval.jsonl", articles[:10])
    Choice(strategy="similarity", metric="angular_last", n=2, dropped=DROPPED, dropped_layers="3..4", start=3,
           distance=0.1, score_name="angular_last distance", score=0.1, kept_ranges="[0,3] + [5,8]", layers_before=8,
           layers_kept=6, parameters_before=0, parameters_after=0).save(root / "choice.json")
    # only local_dir matters here; the other fields of ModelInfo are left empty
    ModelInfo(**{f.name: None for f in fields(ModelInfo)} | {"local_dir": str(root / "base")}).save(root / "base.json")
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_heal(work, out, heal, **kwargs):
    from layerprune.files import read_jsonl

    return heal_model(heal, pruned_dir=work / "pruned", base_dir=work / "base", dropped=DROPPED,
                      articles=read_jsonl(work / "corpus.jsonl"), held_out_ids={f"a{i}" for i in range(10)},
                      checkpoints=out / "checkpoints", log_dir=out / "curves", out_dir=out / "healed", device="cpu",
                      fingerprint_inputs=[work / "pruned"], **kwargs)


def stage_command(work, out, heal_changes, processes=1):
    """The heal stage under torchrun, on the tiny models, with a params.yaml of its own; run it with cwd=out (its
    timings go to logs/ under the working folder)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["heal"] = heal_params(**heal_changes, processes=processes).model_dump()
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    paths = dict(model_info=work / "base.json", pruned_dir=work / "pruned", choice=work / "choice.json",
                 corpus=work / "corpus.jsonl", eval_texts=work / "eval.jsonl", checkpoints=out / "checkpoints",
                 curves=out / "curves", healed_dir=out / "healed", metrics=out / "heal.json")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            str(REPO / "stages/heal.py"), "--params", str(out / "params.yaml"),
            *[arg for name, path in paths.items() for arg in (f"--{name.replace('_', '-')}", str(path))]]


def stage_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def logged(out: Path, metric: str) -> list[tuple[int, float]]:
    rows = (out / "curves" / "plots" / "metrics" / f"{metric}.tsv").read_text().splitlines()[1:]
    return [(int(step), float(value)) for step, value in (row.split("\t") for row in rows)]


# ---- pure parts ----


@pytest.mark.parametrize("dropped, layers, per_side, expected", [
    ([8, 9], 16, 2, [6, 7, 8, 9]),  # the embedded default: one cut between pruned layers 7 and 8
    ([8, 9], 16, 1, [7, 8]),
    ([2, 3, 7], 15, 2, [0, 1, 2, 3, 4, 5, 6]),  # cuts before pruned layers 2 and 5, overlapping neighbourhoods
    ([16, 17], 16, 2, [14, 15]),  # a cut at the top has layers below it only
    ([0], 17, 1, [0]),
])
def test_cut_layers(dropped, layers, per_side, expected):
    assert cut_layers(dropped, layers, per_side) == expected


@pytest.mark.parametrize("dropped, layers, per_side, expected", [
    ([8, 9], 16, 2, [(10, 12)]),  # output of pruned layer 9 = base layer 11
    ([16, 17], 16, 2, [(16, 16)]),  # a cut at the top: the last states of both
    ([2, 3, 7], 15, 1, [(3, 5), (6, 9)]),  # pruned layer 2 = base 4; pruned layer 5 = base 8
])
def test_matched_states(dropped, layers, per_side, expected):
    assert matched_states(dropped, layers, per_side) == expected


def test_pack_closes_texts_with_eos_and_drops_the_rest():
    blocks = pack([[5, 6, 7], [8, 9], [10, 1]], seq_len=3, eos_id=1)
    assert blocks.tolist() == [[5, 6, 7], [1, 8, 9], [1, 10, 1]]
    assert pack([[5, 6, 7, 8]], seq_len=3, eos_id=None).tolist() == [[5, 6, 7]]
    # with BOS every block starts with it, followed by seq_len - 1 tokens of the stream
    assert pack([[5, 6, 7], [8, 9]], seq_len=3, eos_id=1, bos_id=0).tolist() == [[0, 5, 6], [0, 7, 1], [0, 8, 9]]


def test_training_and_validation_text_leave_out_the_held_out_articles():
    # 50 articles of 7 tokens and EOS, article i all token i + 2; seq_len 16 and batch 4 need 64 tokens: 8 articles
    articles = [{"id": i, "text": " ".join([f"w{i + 2}"] * 7)} for i in range(50)] + [{"id": 50, "text": "  "}]
    heal = heal_params(tokens=16 * 4, validation_texts=5)
    data = training_data(heal, number_tokenizer(), articles, held_out_ids={3, 7, 11})
    assert data.validation_texts == 8  # 5 asked for, 8 needed to fill one batch of validation blocks
    assert data.validation.shape == (4, 16)
    articles_in = lambda blocks: {int(t) - 2 for t in blocks.flatten()} - {-1}  # noqa: E731 (EOS is 1)
    in_validation, in_training = articles_in(data.validation), articles_in(data.train)
    assert len(in_validation) == 8 and not in_validation & {3, 7, 11}
    assert data.steps == 1 and len(data.train) == 4 and not in_training & {3, 7, 11}
    assert torch.equal(training_data(heal, number_tokenizer(), articles, {3, 7, 11}).train, data.train)  # seeded
    with pytest.raises(UserError, match="heal.validation_texts=47: the 47 articles besides the held-out ones"):
        training_data(heal_params(validation_texts=47), number_tokenizer(), articles, {3, 7, 11})
    with pytest.raises(UserError, match="the 8 articles .* cannot fill one batch of heal.batch_size=4 validation"):
        training_data(heal, number_tokenizer(), articles[:8], set())  # all 8 for validation, none left to train
    with pytest.raises(UserError, match="the training text packs into 1 blocks"):
        training_data(heal, number_tokenizer(), articles[:10], set())  # 2 articles left: 16 tokens, one block


def test_the_shortfall_is_what_the_text_lacked_not_the_rounding_to_whole_steps():
    # 50 articles of 7 tokens and EOS: 8 for validation, 42 × 8 = 336 tokens of training text, 21 blocks of 16
    articles = [{"id": i, "text": " ".join([f"w{i + 2}"] * 7)} for i in range(50)]
    ample = training_data(heal_params(tokens=64 * 3 + 10), number_tokenizer(), articles, set())
    assert (ample.steps, ample.shortfall(heal_params(tokens=64 * 3 + 10))) == (3, 0)  # 202 tokens: 3 whole steps
    heal = heal_params(tokens=64 * 8 + 10)  # 8 steps wanted, the text packs into 21 blocks: 5 steps of 4
    short = training_data(heal, number_tokenizer(), articles, set())
    assert (short.steps, len(short.train), short.shortfall(heal)) == (5, 20, 3 * 64)
    repeated = training_data(heal_params(tokens=64 * 8 + 10, repeat=True), number_tokenizer(), articles, set())
    assert (repeated.steps, repeated.shortfall(heal)) == (8, 0)


def test_the_validation_slice_is_whole_batches():
    # validation_texts=48 articles of 8 tokens pack into 24 blocks of 16; batch 5 keeps 20: 4 whole batches
    articles = [{"id": i, "text": " ".join([f"w{i + 2}"] * 7)} for i in range(100)]
    data = training_data(heal_params(validation_texts=48, batch_size=5, tokens=16 * 5), number_tokenizer(),
                         articles, set())
    assert data.validation_texts == 48 and data.validation.shape == (20, 16)


def test_validation_size_takes_more_texts_only_when_they_do_not_fill_a_batch():
    assert validation_size([100] * 30, minimum=16, tokens_needed=1020) == 16  # long articles: what was asked
    assert validation_size([30] * 60, minimum=16, tokens_needed=1020) == 34  # 34 × 30 = 1020
    assert validation_size([30] * 20, minimum=16, tokens_needed=1020) == 21  # not enough text: more than there is


def test_budget_beyond_the_text_trains_one_pass_unless_repeat():
    heal = heal_params(tokens=4 * 16 * 10, seq_len=16, batch_size=4)
    assert plan_steps(heal, available_blocks=40) == 10
    assert plan_steps(heal, available_blocks=39) == 9  # the text runs out: one pass, whole steps
    assert plan_steps(heal_params(tokens=640, repeat=True), available_blocks=3) == 10
    with pytest.raises(UserError, match=r"heal.tokens=63 is less than one step .* = 64 tokens"):
        plan_steps(heal_params(tokens=63), available_blocks=40)
    with pytest.raises(UserError) as err:
        plan_steps(heal, available_blocks=3)
    assert str(err.value) == ("heal: the training text packs into 3 blocks of heal.seq_len=16, fewer than one step "
                              "of heal.batch_size × heal.accumulation = 4; lower heal.seq_len or heal.batch_size, "
                              "or fetch more text (data.max_articles)")
    with pytest.raises(UserError, match="packs into 0 blocks"):
        plan_steps(heal_params(tokens=640, repeat=True), available_blocks=0)
    assert plan_steps(heal_params(tokens=0), available_blocks=0) == 0  # nothing to train: no error


@pytest.mark.parametrize("change, message", [
    ({"lora_rank": 4}, "heal.lora_rank is set but heal.trainable='cut'"),
    ({"trainable": "lora", "lora_alpha": 8.0, "loss": {"lm": 1.0}}, None),
    ({"trainable": "everything"}, "heal.trainable='everything'"),
    ({"loss": {"ce": 1.0}}, "heal.loss.ce: unknown key"),
    ({"loss": {"lm": 0.0}}, "heal.loss: give at least one of lm, kl, hidden"),
])
def test_bad_heal_params_are_one_line(change, message):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["heal"].update(change)
    if message is None:
        assert parse_params(raw).heal.lora_rank == 8
        return
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        parse_params(raw)
    assert "\n" not in str(err.value)


# ---- the objective, against transformers' own loss ----


def test_losses_against_references():
    model, same = tiny_llama(seed=3), tiny_llama(seed=3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])

    def loss(teacher, **weights):
        heal = heal_params(loss=weights)
        trainer = HealTrainer(model=model.train(), args=args, heal=heal, teacher=teacher, matched=[(3, 3), (6, 6)])
        return trainer.compute_loss(model, {"input_ids": ids}).item()

    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss.item()
        logits = model(input_ids=ids).logits
    assert loss(None, lm=1.0) == pytest.approx(reference, rel=1e-5)
    every_third = torch.nn.functional.cross_entropy(logits[:, 0:11:3].flatten(0, 1), ids[:, 1:12:3].flatten())
    heal = heal_params(loss={"lm": 1.0}, head_every=3)
    assert HealTrainer(model=model, args=args, heal=heal).compute_loss(model, {"input_ids": ids}).item() == \
        pytest.approx(every_third.item(), rel=1e-5)
    # a student that is its teacher has nothing to learn from it
    assert loss(same.eval(), kl=1.0) == pytest.approx(0.0, abs=1e-6)
    assert loss(same.eval(), hidden=1.0) == pytest.approx(0.0, abs=1e-6)
    other = tiny_llama(seed=4).eval()
    with torch.no_grad():
        mine, theirs = model(input_ids=ids, output_hidden_states=True).hidden_states[3], \
            other(input_ids=ids, output_hidden_states=True).hidden_states[3]
    relative = (mine - theirs).norm(dim=-1) ** 2 / theirs.norm(dim=-1) ** 2
    heal = heal_params(loss={"hidden": 2.0})
    trainer = HealTrainer(model=model, args=args, heal=heal, teacher=other, matched=[(3, 3)])
    assert trainer.compute_loss(model, {"input_ids": ids}).item() == pytest.approx(2 * relative.mean().item(), rel=1e-5)


# ---- heal_model in this process ----


def test_zero_tokens_links_the_pruned_files(work, tmp_path):
    result = run_heal(work, tmp_path, heal_params(tokens=0))
    assert result.metrics()["steps"] == 0
    for path in (work / "pruned").iterdir():
        assert (tmp_path / "healed" / path.name).stat().st_ino == path.stat().st_ino


def test_cut_training_changes_only_the_layers_beside_the_cut(work, tmp_path):
    result = run_heal(work, tmp_path, heal_params(cut_layers=1))
    assert result.steps == 12 and result.tokens == 12 * 4 * 16
    assert (tmp_path / "healed/config.json").read_bytes() == (work / "pruned/config.json").read_bytes()
    before = AutoModelForCausalLM.from_pretrained(work / "pruned").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "healed").state_dict()
    changed = {name.split(".")[2] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"2", "3"}  # the cut lies between pruned layers 2 and 3
    assert result.validation_loss[12] < result.validation_loss[0]


def test_lora_is_merged_into_a_plain_model(work, tmp_path):
    run_heal(work, tmp_path, heal_params(trainable="lora", lora_rank=4, learning_rate=1e-2))
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    before = AutoModelForCausalLM.from_pretrained(work / "pruned").state_dict()
    after = healed.state_dict()
    assert set(after) == set(before)  # no adapter weights left
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.split(".")[2] in {"1", "2", "3", "4"} and "proj" in name for name in changed)


def test_non_finite_loss_stops_and_records_nothing(work, tmp_path, monkeypatch):
    real = HealTrainer.compute_loss

    def nan_at_step_3(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * math.nan if model.training and self.state.global_step == 2 else loss

    monkeypatch.setattr(HealTrainer, "compute_loss", nan_at_step_3)
    with pytest.raises(UserError, match=r"the training loss is nan at step 3 with learning rate") as err:
        run_heal(work, tmp_path, heal_params())
    assert "\n" not in str(err.value)
    assert not (tmp_path / "healed").exists() and not (tmp_path / "curves").exists()


def test_sequence_longer_than_the_context(work, tmp_path):
    context = r"heal.seq_len=300 is above the model's context \(max_position_embeddings=256\)"
    with pytest.raises(UserError, match=context):
        run_heal(work, tmp_path, heal_params(seq_len=300))


# ---- the stage under torchrun: resume after SIGKILL, fresh start on change, two processes ----


def test_killed_heal_resumes_to_the_same_result(work, tmp_path):
    changes = dict(tokens=4 * 16 * 60, save_every=10, eval_every=20)
    whole = tmp_path / "whole"
    subprocess.run(stage_command(work, whole, changes), env=stage_env(), cwd=whole, check=True, capture_output=True)

    cut = tmp_path / "cut"
    process = subprocess.Popen(stage_command(work, cut, changes), env=stage_env(), cwd=cut, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoints/checkpoint-20/trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the heal ended before its second checkpoint"
        time.sleep(0.05)
    launcher = psutil.Process(process.pid)
    for proc in [*launcher.children(recursive=True), launcher]:  # the training worker first, then torchrun
        proc.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cut / "heal.json").exists()

    subprocess.run(stage_command(work, cut, changes), env=stage_env(), cwd=cut, check=True, capture_output=True)
    resumed_from = json.loads((cut / "logs/heal.timing.json").read_text())["resumed_from_step"]
    assert 20 <= resumed_from < 60
    # Same steps; the loss within 1e-5 (CPU float reductions may round differently after a reload)
    whole_metrics, cut_metrics = (json.loads((d / "heal.json").read_text()) for d in (whole, cut))
    assert cut_metrics["steps"] == whole_metrics["steps"] == 60
    assert cut_metrics["train_loss"] == pytest.approx(whole_metrics["train_loss"], abs=1e-5)
    for metric in ("train/loss", "eval/loss"):
        resumed, straight = logged(cut, metric), logged(whole, metric)
        assert [s for s, _ in resumed] == [s for s, _ in straight]
        assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], abs=1e-5)

    # A changed param makes the checkpoints someone else's: the next run starts from step 0.
    subprocess.run(stage_command(work, cut, {**changes, "learning_rate": 2e-3}), env=stage_env(), cwd=cut, check=True,
                   capture_output=True)
    assert json.loads((cut / "logs/heal.timing.json").read_text())["resumed_from_step"] == 0


def test_two_processes_follow_the_one_process_curve(work, tmp_path):
    changes = dict(tokens=4 * 16 * 8, save_every=100, eval_every=4)
    for processes in (1, 2):
        result = subprocess.run(stage_command(work, tmp_path / str(processes), changes, processes), env=stage_env(),
                                cwd=tmp_path / str(processes), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    for metric in ("train/loss", "eval/loss"):
        one, two = logged(tmp_path / "1", metric), logged(tmp_path / "2", metric)
        assert [s for s, _ in one] == [s for s, _ in two] and len(one) > 1
        assert [v for _, v in two] == pytest.approx([v for _, v in one], abs=1e-4)

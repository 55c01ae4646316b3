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

import numpy as np
import psutil
import pytest
import torch
import yaml
from layerprune.tiny_models import VOCAB, tiny_llama
from transformers import AutoModelForCausalLM, TrainingArguments

from layerprune.errors import UserError
from layerprune.heal import HealTrainer, cut_layers, heal_model, matched_states, plan_steps, training_data
from layerprune.heal_corpus import HeldOut, corpus_rows, prepare
from layerprune.models import ModelInfo
from layerprune.params import HealCorpusParams, HealLaunchParams, HealParams, parse_params
from layerprune.strategies import Choice

REPO = Path(__file__).resolve().parent.parent
DROPPED = [3, 4]  # of the tiny 8-layer base


pytestmark = pytest.mark.usefixtures("one_thread")


def heal_params(**changes) -> HealParams:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["heal"]
    raw.update(tokens=4 * 16 * 12, seq_len=16, batch_size=4, learning_rate=1e-3, eval_every=5, loss={"lm": 1.0},
               head_every=1, trainable="cut", warmup=0.0)
    raw.update(changes)
    return HealParams.model_validate(raw)


def launch_params(**changes) -> HealLaunchParams:
    return HealLaunchParams.model_validate({"save_every": 3, **changes})


def prepare_shards(corpus: Path, eval_texts: Path, tokenizer_dir: Path, out: Path, **changes) -> Path:
    """The heal-corpus stage's work: the corpus minus the held-out texts as token shards (4 validation texts)."""
    source = HealCorpusParams.model_validate({"validation_texts": 4, "validation_tokens": 64, **changes})
    prepare(source, lambda state: corpus_rows(corpus, source.seed, state), tokenizer_dir=tokenizer_dir,
            held_out=HeldOut.read(eval_texts, 2000), out_dir=out, source_id={"source": "corpus"}, progress=False)
    return out


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
    prepare_shards(root / "corpus.jsonl", root / "eval.jsonl", root / "pruned", root / "shards")
    Choice(strategy="similarity", metric="angular_last", n=2, dropped=DROPPED, dropped_layers="3..4", start=3,
           distance=0.1, score_name="angular_last distance", score=0.1, kept_ranges="[0,3] + [5,8]", layers_before=8,
           layers_kept=6, parameters_before=0, parameters_after=0).save(root / "choice.json")
    # only local_dir matters here; the other fields of ModelInfo are left empty
    ModelInfo(**{f.name: None for f in fields(ModelInfo)} | {"local_dir": str(root / "base")}).save(root / "base.json")
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_heal(work, out, heal, launch=None, **kwargs):
    return heal_model(heal, launch or launch_params(), pruned_dir=work / "pruned", base_dir=work / "base",
                      dropped=DROPPED, shards=work / "shards", checkpoints=out / "checkpoints", log_dir=out / "curves",
                      out_dir=out / "healed", device="cpu", fingerprint_inputs=[work / "pruned"], **kwargs)


def stage_command(work, out, heal_changes, processes=1, **launch_changes):
    """The heal stage under torchrun, on the tiny models, with a params.yaml of its own; run it with cwd=out (its
    timings go to logs/ under the working folder)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["heal"] = heal_params(**heal_changes).model_dump()
    params["heal_launch"] = launch_params(processes=processes, **launch_changes).model_dump()
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    paths = dict(model_info=work / "base.json", pruned_dir=work / "pruned", choice=work / "choice.json",
                 shards=work / "shards", checkpoints=out / "checkpoints", curves=out / "curves",
                 healed_dir=out / "healed", metrics=out / "heal.json")
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


def numbered_shards(tmp_path, texts: int, length: int, **changes) -> Path:
    """Shards of `texts` texts of `length` - 1 tokens each, text i all token i + 2, each closed by EOS (1)."""
    rows = [{"id": i, "text": " ".join([f"w{i + 2}"] * (length - 1))} for i in range(texts)]
    write_jsonl(tmp_path / "corpus.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", [{"id": "none", "text": "w1"}])
    save_tokenizer(tmp_path / "tokenizer")
    return prepare_shards(tmp_path / "corpus.jsonl", tmp_path / "eval.jsonl", tmp_path / "tokenizer",
                          tmp_path / "shards", **changes)


def test_blocks_are_slices_of_the_stream_across_shards_with_bos_in_front(tmp_path):
    from layerprune.heal import Blocks
    from layerprune.heal_corpus import TokenShards

    shards = numbered_shards(tmp_path, texts=20, length=5, shard_tokens=7, validation_texts=2, validation_tokens=1)
    tokens = TokenShards(shards, "train")
    validation = TokenShards(shards, "validation")
    stream = [token for article in range(20) for token in [article + 2] * 4 + [1]]
    assert len(validation) == 10  # 2 texts of 5 tokens
    assert sorted(tokens.read(0, len(tokens)).tolist() + validation.read(0, 10).tolist()) == sorted(stream)
    ordered = tokens.read(0, len(tokens)).tolist()
    blocks = Blocks(tokens, seq_len=4, bos=0, order=np.array([0, 4, 2]), length=5)
    assert [blocks[i]["input_ids"].tolist() for i in range(5)] == [
        [0] + ordered[0:3], [0] + ordered[12:15], [0] + ordered[6:9], [0] + ordered[0:3], [0] + ordered[12:15]]
    assert len(tokens.maps) == 13  # 90 tokens in shards of 7: block [6, 9) and [12, 15) cross shard ends
    assert Blocks(tokens, seq_len=4, bos=None, order=np.array([1]), length=1)[0]["input_ids"].tolist() == ordered[4:8]


def test_training_data_is_one_seeded_permutation_of_the_blocks_and_whole_validation_batches(tmp_path):
    # 50 texts of 8 tokens (7 + EOS); 8 for validation (64 tokens: 4 blocks of 16), 42 × 8 = 336 for training
    shards = numbered_shards(tmp_path, texts=50, length=8, validation_texts=5, validation_tokens=64)
    heal = heal_params(tokens=16 * 4 * 5)
    data = training_data(heal, shards)
    assert data.validation_texts == 8 and len(data.validation) == 4  # 5 asked for, 8 to reach 64 tokens
    assert data.available_blocks == 21 and data.steps == 5 and len(data.train) == 20
    picked = [int(data.train.order[i]) for i in range(21)]
    assert sorted(picked) == list(range(21)) and picked != list(range(21))  # every block once, shuffled
    again = training_data(heal, shards)
    assert [again.train[i]["input_ids"].tolist() for i in range(20)] == \
        [data.train[i]["input_ids"].tolist() for i in range(20)]
    other = training_data(heal_params(tokens=16 * 4 * 5, seed=1), shards)
    assert [int(other.train.order[i]) for i in range(21)] != picked
    with pytest.raises(UserError, match="the validation shards hold 64 tokens, less than one batch of "
                                        "heal.batch_size=5 blocks of heal.seq_len=16") as err:
        training_data(heal_params(batch_size=5), shards)
    assert "\n" not in str(err.value)


def test_the_shortfall_is_what_the_text_lacked_not_the_rounding_to_whole_steps(tmp_path):
    # 50 texts of 8 tokens: 8 for validation, 42 × 8 = 336 tokens of training text, 21 blocks of 16
    shards = numbered_shards(tmp_path, texts=50, length=8, validation_texts=5, validation_tokens=64)
    ample = training_data(heal_params(tokens=64 * 3 + 10), shards)
    assert (ample.steps, ample.shortfall(heal_params(tokens=64 * 3 + 10))) == (3, 0)  # 202 tokens: 3 whole steps
    heal = heal_params(tokens=64 * 8 + 10)  # 8 steps wanted, the text packs into 21 blocks: 5 steps of 4
    short = training_data(heal, shards)
    assert (short.steps, len(short.train), short.shortfall(heal)) == (5, 20, 3 * 64)
    repeated = training_data(heal_params(tokens=64 * 8 + 10, repeat=True), shards)
    assert (repeated.steps, len(repeated.train), repeated.shortfall(heal)) == (8, 32, 0)
    assert repeated.train[21]["input_ids"].tolist() == repeated.train[0]["input_ids"].tolist()  # the second pass


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
                              "or give the heal more text (heal_corpus)")
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


KILLED = dict(tokens=4 * 16 * 60, eval_every=20)


@pytest.fixture(scope="module")
def straight(work, tmp_path_factory):
    """The heal of KILLED run uninterrupted, one process, checkpoints every 10 steps."""
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(stage_command(work, out, KILLED, save_every=10), env=stage_env(), cwd=out, check=True,
                   capture_output=True)
    return out


def kill_after_checkpoint(command, out: Path, step: int) -> None:
    process = subprocess.Popen(command, env=stage_env(), cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / f"checkpoints/checkpoint-{step}/trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, f"the heal ended before checkpoint {step}"
        time.sleep(0.05)
    launcher = psutil.Process(process.pid)
    for proc in [*launcher.children(recursive=True), launcher]:  # the training workers first, then torchrun
        proc.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "heal.json").exists()


def assert_same_heal(resumed: Path, straight: Path) -> None:
    """Same steps; the losses within 1e-5 (CPU float reductions may round differently after a reload); the curves'
    summary and the healed config byte for byte."""
    a, b = (json.loads((d / "heal.json").read_text()) for d in (resumed, straight))
    assert a["steps"] == b["steps"] == 60
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    for metric in ("train/loss", "eval/loss"):
        mine, theirs = logged(resumed, metric), logged(straight, metric)
        assert [s for s, _ in mine] == [s for s, _ in theirs]
        assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], abs=1e-5)
    summary = lambda d: json.loads((d / "curves/metrics.json").read_text())  # noqa: E731
    assert list(summary(resumed)) == list(summary(straight))  # the same keys in the same order
    assert summary(resumed)["step"] == summary(straight)["step"]


def test_killed_heal_resumes_to_the_same_result(work, straight, tmp_path):
    cut = tmp_path / "cut"
    kill_after_checkpoint(stage_command(work, cut, KILLED, save_every=10), cut, 20)
    subprocess.run(stage_command(work, cut, KILLED, save_every=10), env=stage_env(), cwd=cut, check=True,
                   capture_output=True)
    resumed_from = json.loads((cut / "logs/heal.timing.json").read_text())["resumed_from_step"]
    assert 20 <= resumed_from < 60
    assert_same_heal(cut, straight)

    # A changed param makes the checkpoints someone else's: the next run starts from step 0.
    subprocess.run(stage_command(work, cut, {**KILLED, "learning_rate": 2e-3}), env=stage_env(), cwd=cut, check=True,
                   capture_output=True)
    assert json.loads((cut / "logs/heal.timing.json").read_text())["resumed_from_step"] == 0


def test_a_checkpoint_of_two_processes_resumes_with_one_and_another_save_interval(work, straight, tmp_path):
    """heal_launch is how a heal runs, not what it computes: its checkpoints outlive a change of it."""
    cut = tmp_path / "cut"
    kill_after_checkpoint(stage_command(work, cut, KILLED, processes=2, save_every=10), cut, 20)
    subprocess.run(stage_command(work, cut, KILLED, processes=1, save_every=7), env=stage_env(), cwd=cut, check=True,
                   capture_output=True)
    assert json.loads((cut / "logs/heal.timing.json").read_text())["resumed_from_step"] >= 20
    assert_same_heal(cut, straight)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(command: list[str]) -> list[str]:
    """The stage command as one of two torchrun agents of one process each, meeting on loopback (c10d)."""
    script = command.index(str(REPO / "stages/heal.py"))
    return [*command[:3], "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{PORT}", "--rdzv-id", "heal-test", *command[script:]]


PORT = free_port()


def test_parallel_heals_follow_the_one_process_curve(work, tmp_path):
    """2 processes (DDP), 2 processes sharded (FSDP2), and two one-process nodes on loopback: the global batch is the
    same, so the curve and the healed weights are the one process's."""
    changes = dict(tokens=4 * 16 * 8, eval_every=4)
    runs = {"1": dict(processes=1), "2": dict(processes=2), "fsdp": dict(processes=2, fsdp=True)}
    for name, launch in runs.items():
        result = subprocess.run(stage_command(work, tmp_path / name, changes, save_every=100, **launch),
                                env=stage_env(), cwd=tmp_path / name, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    nodes = [subprocess.Popen(two_nodes(stage_command(work, tmp_path / "nodes", changes, save_every=100)),
                              env=stage_env(), cwd=tmp_path / "nodes", stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        assert node.wait(timeout=600) == 0, node.stderr.read()[-2000:]
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "1" / "healed").state_dict()
    for name in ("2", "fsdp", "nodes"):
        for metric in ("train/loss", "eval/loss"):
            mine, theirs = logged(tmp_path / name, metric), logged(tmp_path / "1", metric)
            assert [s for s, _ in mine] == [s for s, _ in theirs] and len(mine) > 1
            assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], abs=1e-4), (name, metric)
        healed = AutoModelForCausalLM.from_pretrained(tmp_path / name / "healed").state_dict()
        assert set(healed) == set(one)
        assert max((healed[key] - one[key]).abs().max().item() for key in one) < 1e-5, name
        assert (tmp_path / name / "healed/config.json").read_bytes() == (work / "pruned/config.json").read_bytes()


def test_a_sharded_checkpoint_resumes_with_one_process_and_only_under_fsdp(work, straight, tmp_path):
    cut = tmp_path / "cut"
    kill_after_checkpoint(stage_command(work, cut, KILLED, processes=2, save_every=10, fsdp=True), cut, 20)
    checkpoint = cut / "checkpoints/checkpoint-20"
    assert len(list(checkpoint.glob("pytorch_model_fsdp_0/*.distcp"))) == 2  # one shard per rank
    assert not list(checkpoint.glob("*.safetensors"))  # no rank gathered the weights
    refused = subprocess.run(stage_command(work, cut, KILLED, processes=1, save_every=10), env=stage_env(), cwd=cut,
                             capture_output=True, text=True)
    assert refused.returncode != 0  # torchrun reports the worker's one-line error and exits 1
    assert "error: " + str(cut / "checkpoints/checkpoint-20") + " was made with heal_launch.fsdp: true; resume with it" \
        in refused.stderr
    subprocess.run(stage_command(work, cut, KILLED, processes=1, save_every=10, fsdp=True), env=stage_env(), cwd=cut,
                   check=True, capture_output=True)
    assert json.loads((cut / "logs/heal.timing.json").read_text())["resumed_from_step"] >= 20
    assert_same_heal(cut, straight)


def test_gradient_checkpointing_computes_the_same_heal(work, tmp_path):
    plain = run_heal(work, tmp_path / "plain", heal_params(tokens=4 * 16 * 4))
    recomputed = run_heal(work, tmp_path / "recomputed", heal_params(tokens=4 * 16 * 4),
                          launch_params(gradient_checkpointing=True))
    assert recomputed.validation_loss == pytest.approx(plain.validation_loss, abs=1e-6)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name / "healed").state_dict()
            for name in ("plain", "recomputed"))
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-6


def test_a_larger_budget_continues_a_finished_warmup_stable_decay_heal(work, tmp_path):
    """8 steps (warm-up 2, decay the last 2), then 16 in the same folders: the second continues from step 6, the last
    before the first one's decay, and ends where a heal of 16 steps from scratch ends."""
    wsd = dict(schedule="warmup_stable_decay", warmup=2, decay=0.25, eval_every=4)
    first = run_heal(work, tmp_path / "extended", heal_params(tokens=4 * 16 * 8, **wsd))
    assert first.resumed_from == 0 and (tmp_path / "extended/checkpoints-branch/checkpoint-6").is_dir()
    extended = run_heal(work, tmp_path / "extended", heal_params(tokens=4 * 16 * 16, **wsd))
    direct = run_heal(work, tmp_path / "direct", heal_params(tokens=4 * 16 * 16, **wsd))
    assert extended.resumed_from == 6 and direct.resumed_from == 0
    assert extended.validation_loss == pytest.approx(direct.validation_loss, abs=1e-5)
    assert sorted(extended.validation_loss) == [0, 4, 8, 12, 16]
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name / "healed").state_dict()
            for name in ("extended", "direct"))
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-5
    # a smaller budget cannot continue from the larger one's branch (step 12): it starts over
    assert run_heal(work, tmp_path / "direct", heal_params(tokens=4 * 16 * 8, **wsd)).resumed_from == 0

"""Heal the cut: continued training of the pruned model in its language, through the transformers Trainer.

What is ours and why: blocks read from the heal corpus's memory-mapped token shards (heal_corpus.py) in one seeded
permutation, choosing which weights train (the layers around each cut, all layers, or LoRA through peft), a loss that
can skip most of the 262k-token head (logit losses on every k-th position, or matching the base model's hidden state
just above each cut, which needs no head at all), the checkpoint fingerprint that lets a killed heal resume only when
the params, the input files and this code are unchanged, and the checkpoint before a warmup_stable_decay decay that a
larger budget continues from. The loop, data parallelism, FSDP2 sharding, checkpoints and logging are the Trainer's
(with accelerate under it).
"""
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import DVCLiveCallback

from layerprune.budget import ENV_VAR, Workload, feed_forward_size, gib, memory_budget
from layerprune.cost import Cost
from layerprune.errors import UserError
from layerprune.files import atomic_dir, file_sha256, link_or_copy, read_json, write_json
from layerprune.heal_corpus import TokenShards
from layerprune.layers import decoder_layers
from layerprune.models import load_model, num_layers as num_layers_in
from layerprune.strategies import runs

FINGERPRINT = "fingerprint.json"
# What the DVCLive log keeps: numbers that repeat exactly between identical runs (no runtimes, no timestamps).
LOGGED = ("loss", "eval_loss", "learning_rate", "grad_norm")


# ---- text: blocks of the heal corpus's token stream ----


class Blocks(torch.utils.data.Dataset):
    """Blocks of seq_len tokens cut from a memory-mapped token stream (heal_corpus.TokenShards): block k is tokens
    [k·w, (k+1)·w) of the stream, w = seq_len - 1 with BOS in front when the tokenizer has one (a block that starts
    mid-text would otherwise lack the token models like Gemma use as their attention sink), else w = seq_len.
    Item i is block order[i mod len(order)]: a seeded permutation read once per pass (heal.repeat reads it again)."""

    def __init__(self, tokens: TokenShards, seq_len: int, bos: int | None, order: np.ndarray, length: int):
        self.tokens, self.bos, self.order, self.length = tokens, bos, order, length
        self.width = seq_len - (bos is not None)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        block = int(self.order[index % len(self.order)])
        ids = torch.from_numpy(self.tokens.read(block * self.width, (block + 1) * self.width).astype(np.int64))
        if self.bos is not None:
            ids = torch.cat([torch.tensor([self.bos]), ids])
        # labels only tell the Trainer's evaluation that there is a loss to compute; compute_loss uses input_ids
        return {"input_ids": ids, "labels": ids}


# ---- the budget ----


def plan_steps(heal, available_blocks: int) -> int:
    """Optimizer steps for the heal params: what the token budget buys, or fewer when the training text runs out
    first. Without heal.repeat the heal then trains one pass over the text and the shortfall is recorded (the
    bundled text of most languages is 1,000 short sentences, less than the default budget); with it, the text is
    read again until the budget is spent."""
    blocks_per_step = heal.batch_size * heal.accumulation
    steps = heal.tokens // (blocks_per_step * heal.seq_len)
    if heal.tokens and not steps:
        raise UserError(f"heal.tokens={heal.tokens} is less than one step of heal.batch_size × heal.accumulation × "
                        f"heal.seq_len = {heal.batch_size} × {heal.accumulation} × {heal.seq_len} = "
                        f"{blocks_per_step * heal.seq_len} tokens")
    if not heal.repeat:
        steps = min(steps, available_blocks // blocks_per_step)
    if heal.tokens and not (steps and available_blocks):
        raise UserError(f"heal: the training text packs into {available_blocks} blocks of heal.seq_len={heal.seq_len}, "
                        f"fewer than one step of heal.batch_size × heal.accumulation = {blocks_per_step}; lower "
                        "heal.seq_len or heal.batch_size, or give the heal more text (heal_corpus)")
    return steps


# ---- which weights train ----


def cuts(dropped) -> list[int]:
    """Where each cut lies in the pruned model: a run of dropped base layers starting at s is a cut between pruned
    layers p - 1 and p, where p is the number of base layers kept below s."""
    positions, dropped_below = [], 0
    for first, stop in runs(dropped):
        positions.append(first - dropped_below)
        dropped_below += stop - first
    return positions


def cut_layers(dropped: list[int], num_pruned_layers: int, per_side: int) -> list[int]:
    """Pruned-model indices of the `per_side` layers before and after each cut."""
    selected = set()
    for p in cuts(dropped):
        selected.update(range(max(0, p - per_side), min(num_pruned_layers, p + per_side)))
    return sorted(selected)


def matched_states(dropped: list[int], num_pruned_layers: int, per_side: int) -> list[tuple[int, int]]:
    """(pruned, base) indices into HF's hidden_states of the state above each cut's trained layers.

    If the pruned model reproduced the base there, every layer above would see what it saw in the base model: the
    output of the top trained layer of each cut is where the `hidden` loss compares the two."""
    kept = [layer for layer in range(num_pruned_layers + len(set(dropped))) if layer not in set(dropped)]
    tops = [min(p + per_side, num_pruned_layers) - 1 for p in cuts(dropped)]  # the highest trained layer above
    return [(top + 1, kept[top] + 1) for top in tops]  # hidden_states[k] is the output of layer k - 1


def select_trainable(model, heal, cut: list[int]):
    """Freeze all but the chosen weights; returns the model to train (a peft model for LoRA)."""
    layers = decoder_layers(model)
    if heal.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        names = [n for n, m in layers.named_modules() if isinstance(m, torch.nn.Linear)]
        config = LoraConfig(r=heal.lora_rank, lora_alpha=heal.lora_alpha, lora_dropout=0.0,
                            target_modules=sorted({n.rsplit(".", 1)[-1] for n in names}),
                            layers_to_transform=cut)
        return get_peft_model(model, config)
    model.requires_grad_(False)
    # "all" is every decoder layer; the embedding table (tied to the 262k-token head on Gemma: 63% of the 270M
    # model's weights) stays frozen: the cut is in the layers, and Adam moments for it would triple the memory.
    for index in range(len(layers)) if heal.trainable == "all" else cut:
        layers[index].requires_grad_(True)
    return model


# ---- the objective ----


class HealTrainer(Trainer):
    """The Trainer with our loss: lm (next-token cross-entropy), kl (to the base model's next-token distribution)
    on every `head_every`-th position, and hidden (the base model's hidden state above each cut, `matched` from
    matched_states, on every position, without the head). Evaluation is always the plain lm loss."""

    def __init__(self, *args, heal, teacher=None, matched=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.heal, self.teacher, self.matched = heal, teacher, matched
        # Our losses are means over equal-sized micro-batches, so the Trainer's division by the accumulation
        # steps is exact; without this it would expect a sum over tokens from a model that takes loss kwargs.
        self.model_accepts_loss_kwargs = False

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None:
            keep_fsdp_on_cpu(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        if not model.training:
            outputs = model(input_ids=ids, labels=ids)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        weights = self.heal.loss
        every = self.heal.head_every
        # Rotate the positions with the step, so over `every` steps the logit losses see every position.
        positions = torch.arange(self.state.global_step % every, ids.shape[1] - 1, every, device=ids.device)
        if not (weights.lm or weights.kl):
            positions = positions[:0]  # hidden only: the head is never computed
        outputs = model(input_ids=ids, logits_to_keep=positions, output_hidden_states=bool(weights.hidden))
        loss = 0.0
        if weights.lm:
            logits = outputs.logits.float()
            loss = loss + weights.lm * F.cross_entropy(logits.flatten(0, 1), ids[:, positions + 1].flatten())
        if weights.kl or weights.hidden:
            with torch.no_grad():
                target = self.teacher(input_ids=ids, logits_to_keep=positions,
                                      output_hidden_states=bool(weights.hidden))
            if weights.kl:
                student, teacher = (F.log_softmax(o.logits.float(), -1).flatten(0, 1) for o in (outputs, target))
                loss = loss + weights.kl * F.kl_div(student, teacher, log_target=True, reduction="batchmean")
            for mine, theirs in self.matched if weights.hidden else ():
                mine, theirs = outputs.hidden_states[mine].float(), target.hidden_states[theirs].float()
                # squared error relative to each token's norm: residual-stream norms differ a lot between tokens
                error = (mine - theirs).pow(2).sum(-1) / theirs.pow(2).sum(-1).clamp(min=1e-12)
                loss = loss + weights.hidden * error.mean() / len(self.matched)
        return (loss, outputs) if return_outputs else loss


def keep_fsdp_on_cpu(trainer) -> None:
    """Hand-written because accelerate (1.15) turns an FSDP plugin into distributed type FSDP only for GPU-like
    process types: with use_cpu=True (gloo) it drops the plugin without a word and wraps the model in DDP. Put the
    plugin back on the accelerator's state and the type on PartialState too (every later AcceleratorState() copies
    PartialState's type over its own, which would turn it back and leave get_state_dict the shards)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or getattr(state, "fsdp_plugin", None) is not None:
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


class NonFinite(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise UserError(f"heal: the training loss is {loss} at step {state.global_step} with learning rate "
                            f"{logs.get('learning_rate', args.learning_rate):.3g}; lower heal.learning_rate "
                            "or add warm-up (heal.warmup)")


class FirstStepCost(TrainerCallback):
    """The heal's FLOPs before its first step, and the time they take at the first step's rate (the Trainer's own
    progress bar shows the ETA after that). Per token: a forward and the backward of the activations through the
    student (4 per weight), the gradients of the trainable weights (2 per weight), the teacher's forward (2)."""

    def __init__(self, model, teacher, heal, steps: int, quiet: bool):
        weights = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        per_token = 4 * weights + 2 * trainable + (2 * sum(p.numel() for p in teacher.parameters()) if teacher else 0)
        self.per_step = per_token * heal.batch_size * heal.accumulation * heal.seq_len
        self.cost = Cost("heal", self.per_step * steps, quiet=quiet)
        self.started = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = self.started or time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.cost.first_batch(self.per_step, time.perf_counter() - self.started)


class EvaluateLast(TrainerCallback):
    """The validation loss at the last step too, whatever heal.eval_every is: it is the result."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            control.should_evaluate = True


class CurveLog(DVCLiveCallback):
    """DVCLive's Trainer callback, keeping only numbers that repeat between identical runs, indexed by optimizer
    step. On resume it rewrites the log from the checkpoint's history, so a killed and resumed heal leaves the same
    files as an uninterrupted one (rows logged after the last checkpoint would otherwise appear twice)."""

    def __init__(self, log_dir):
        from dvclive import Live

        super().__init__(live=Live(str(log_dir), save_dvc_exp=False, dvcyaml=None))

    def setup(self, args, state, model):
        self._initialized = True  # params are in params.yaml already; DVCLive's copy would hold local paths
        if state.is_world_process_zero:
            for logs in state.log_history:
                self._write(state, logs, logs["step"])

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if state.is_world_process_zero:
            self._write(state, logs, state.global_step)

    def _write(self, state, logs, step):
        kept = {key: value for key, value in logs.items() if key in LOGGED}
        if kept:
            self.live.step = step
            for key, value in kept.items():
                self.live.log_metric(f"{'eval' if key.startswith('eval_') else 'train'}/{key.removeprefix('eval_')}",
                                     value)
            self.live.make_summary()


# ---- checkpoints that belong to their inputs ----


HASHES = "input-hashes.json"  # beside the checkpoints: each input's sha256 by its stat, so a resume reads no weights


def fingerprint(heal, inputs: list[Path], hashes: Path | None = None, record: bool = True) -> str:
    """A hash of the heal params, every input file's bytes (models, the cut, the corpus manifest, which holds each
    shard's sha256) and this module's code. With `hashes`, a file whose size, modification time and inode are those
    recorded there is not read again (DVC's own state cache works the same way): a 33 GB teacher is hashed once per
    heal, not at every resume. heal_launch (processes, FSDP, checkpointing, save interval) is not in it: how a heal
    runs does not change what it computes."""
    known = read_json(hashes) if hashes and Path(hashes).exists() else {}
    seen = {}
    digest = hashlib.sha256(json.dumps(heal.model_dump(), sort_keys=True).encode())
    digest.update(Path(__file__).read_bytes())
    for root in inputs:
        for path in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if path.is_file():
                stat = path.stat()
                key, mark = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
                if known.get(key, {}).get("stat") != mark:
                    known[key] = {"stat": mark, "sha256": file_sha256(path)}
                seen[key] = known[key]
                digest.update(path.name.encode() + known[key]["sha256"].encode())
    if hashes and record:
        write_json(hashes, seen)
    return digest.hexdigest()


def resume_point(checkpoints: Path, expected: str) -> str | None:
    """The last complete checkpoint made with this fingerprint; any other checkpoint is deleted (a fresh start).

    A checkpoint is complete once its trainer_state.json exists: the Trainer writes that file last."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    stamp = checkpoints / FINGERPRINT
    if not stamp.exists() or read_json(stamp)["fingerprint"] != expected:
        for old in checkpoints.iterdir():
            if old.name != HASHES:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        write_json(stamp, {"fingerprint": expected})
        return None
    done = [d for d in checkpoints.glob("checkpoint-*") if (d / "trainer_state.json").exists()]
    return str(max(done, key=lambda d: int(d.name.split("-")[1]))) if done else None


# ---- extending a finished heal: warmup_stable_decay continues from the step before its decay ----


def branch_folder(checkpoints) -> Path:
    """Where a finished warmup_stable_decay heal keeps its checkpoint from before the decay: beside the checkpoints
    folder (a DVC output that a finished heal empties), outside DVC, so it survives the heal and `dvc exp` switches."""
    return Path(checkpoints).with_name(Path(checkpoints).name + "-branch")


def branch_fingerprint(heal, steps: int, inputs, hashes: Path, record: bool) -> str:
    """What the state before the decay depends on: every heal param but the budget (the warm-up as the steps it comes
    to), the inputs and the code. Two heals that differ in heal.tokens alone share it."""
    stable = heal.model_copy(update={"tokens": 0, "warmup": float(warmup_steps(heal, steps))})
    return fingerprint(stable, inputs, hashes, record)


def branch_point(folder: Path, expected: str, latest_step: int) -> str | None:
    """The kept checkpoint of a heal with the same branch fingerprint, if it lies no later than this heal's own step
    before the decay (a smaller budget cannot continue a larger one)."""
    stamp = folder / FINGERPRINT
    if not stamp.exists() or read_json(stamp)["fingerprint"] != expected or read_json(stamp)["step"] > latest_step:
        return None
    return str(folder / f"checkpoint-{read_json(stamp)['step']}")


class KeepBranch(TrainerCallback):
    """A checkpoint at the step before the decay, kept (hard links) in branch_folder after the heal ends."""

    def __init__(self, step: int, folder: Path, stamp: str, main: bool):
        self.step, self.folder, self.stamp, self.main = step, folder, stamp, main

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.main:  # the Trainer calls this once the checkpoint is complete
            source = Path(args.output_dir) / f"checkpoint-{self.step}"
            with atomic_dir(self.folder) as tmp:
                shutil.copytree(source, tmp / source.name, copy_function=link_or_copy)
                write_json(tmp / FINGERPRINT, {"fingerprint": self.stamp, "step": self.step})


# ---- the run ----


def check_resumable(start: str | None, launch) -> None:
    """A checkpoint made under FSDP resumes only under FSDP (the Trainer refuses it otherwise, in a message about
    PyTorch FSDP); heal_launch.fsdp is not in the fingerprint, so say which setting to use."""
    if start and not launch.fsdp and any(Path(start).glob("pytorch_model_fsdp*")):
        raise UserError(f"{start} was made with heal_launch.fsdp: true; resume with it (any number of processes), or "
                        f"delete {Path(start).parent} to start over")


def warmup_steps(heal, steps: int) -> int:
    return round(heal.warmup * steps) if heal.warmup < 1 else int(heal.warmup)


def branch_step(heal, steps: int) -> int:
    """warmup_stable_decay: the last step before the decay. Up to it the learning rate does not depend on the budget
    (warm-up given in steps), so a heal of any larger budget passes through the same state there: that is where a
    longer heal continues a finished one from. Other schedules depend on the budget from the first step: 0."""
    if heal.schedule != "warmup_stable_decay":
        return 0
    return steps - max(1, round(heal.decay * steps))


def training_arguments(heal, launch, steps: int, checkpoints: Path, device: str) -> TrainingArguments:
    """The Trainer's arguments for the heal params (what is computed) and heal_launch (how: checkpoint interval,
    gradient checkpointing, FSDP)."""
    cuda = device == "cuda"
    return TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=steps,
        # Every process reads the same global batch and takes its share (split_batches), in one fixed order: the
        # loss curve does not depend on the number of processes.
        per_device_train_batch_size=heal.batch_size,
        per_device_eval_batch_size=heal.batch_size,
        prediction_loss_only=True,
        accelerator_config={"split_batches": True},
        train_sampling_strategy="sequential",  # the blocks are shuffled by heal.seed when packed
        gradient_accumulation_steps=heal.accumulation,
        learning_rate=heal.learning_rate,
        lr_scheduler_type=heal.schedule,
        warmup_steps=warmup_steps(heal, steps),
        lr_scheduler_kwargs={"num_decay_steps": steps - branch_step(heal, steps)}
        if heal.schedule == "warmup_stable_decay" else {},
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=heal.seed,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a non-finite loss must reach NonFinite, not be averaged away
        eval_strategy="steps",
        eval_steps=heal.eval_every,
        eval_on_start=True,
        save_strategy="steps",
        save_steps=launch.save_every,
        save_total_limit=1,
        report_to=[],
        disable_tqdm=False,
        use_cpu=not cuda,
        bf16=cuda,
        # under FSDP its own activation checkpointing (the two together are an error)
        activation_checkpointing=launch.gradient_checkpointing and not launch.fsdp,
        activation_checkpointing_kwargs={"use_reentrant": False},  # the variant that works with frozen layers
        # ddp_backend left to accelerate: gloo on CPU, nccl on CUDA
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **(fsdp_arguments(launch) if launch.fsdp else {}),
    )


def fsdp_arguments(launch) -> dict:
    """FSDP2 through accelerate: one unit per decoder layer (the model's _no_split_modules), weights gathered for
    each layer's forward and resharded after it (ZeRO-3), and checkpoints in torch distributed checkpoint format, each
    rank writing its own shard: no rank ever holds the whole training state."""
    return dict(fsdp=True, fsdp_config={
        "version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "SHARDED_STATE_DICT",
        "cpu_ram_efficient_loading": False,
        "activation_checkpointing": launch.gradient_checkpointing,
    })


def save_healed(model, pruned_dir: Path, out_dir: Path, dtype: torch.dtype, state_dict: dict | None = None) -> None:
    """Weights in the pruned model's dtype, and every other file (config, tokenizer) copied from the pruned model:
    the healed folder has the same config, and loads wherever the pruned one does. state_dict: the full weights
    gathered from FSDP shards (cast here, on the gathered copies: casting the wrapped model would cast its shards)."""
    if state_dict is None:
        model.to(dtype).save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, state_dict={name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                                                   for name, tensor in state_dict.items()})
    for path in Path(pruned_dir).iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and not path.name.endswith(".index.json"):
            shutil.copy2(path, out_dir / path.name)


@dataclass
class Result:
    steps: int
    tokens: int
    trainable_parameters: int
    train_loss: float | None  # the objective at the last step
    validation_loss: dict[int, float]  # step -> lm loss on the validation slice, nats per token
    resumed_from: int  # step of the checkpoint this run started from (0: fresh)
    train_seconds: float
    shortfall: int = 0  # tokens of heal.tokens not trained: the text ran out (one pass, heal.repeat: false)
    validation_texts: int = 0  # articles in the validation slice
    is_main_process: bool = True

    def metrics(self) -> dict:
        """What repeats between identical runs at the precision written (metrics/heal.json, in git)."""
        first, last = (self.validation_loss[min(self.validation_loss)], self.validation_loss[max(self.validation_loss)]
                       ) if self.validation_loss else (None, None)
        four = lambda x: None if x is None else round(x, 4)  # noqa: E731
        return {"tokens": self.tokens, "shortfall": self.shortfall, "steps": self.steps,
                "trainable_parameters": self.trainable_parameters, "validation_texts": self.validation_texts,
                "train_loss": four(self.train_loss),
                "validation_loss": {"before": four(first), "after": four(last)}}

    def timing(self) -> dict:
        trained = (self.steps - self.resumed_from) * (self.tokens // max(self.steps, 1))
        return {"train_seconds": self.train_seconds, "resumed_from_step": self.resumed_from,
                "tokens_per_second": trained / self.train_seconds if self.train_seconds else 0.0}


@dataclass
class HealData:
    train: Blocks  # in training order: every block the optimizer steps read
    validation: Blocks  # whole batches
    steps: int
    validation_texts: int  # texts in the validation shards
    available_blocks: int  # training blocks in the corpus (one pass)

    def shortfall(self, heal) -> int:
        """Tokens of the budget left untrained because the text ran out (heal.repeat: false). A budget that is not a
        whole number of steps is rounded down to whole steps and is no shortfall."""
        per_step = heal.batch_size * heal.accumulation * heal.seq_len
        return heal.tokens // per_step * per_step - len(self.train) * heal.seq_len


def training_data(heal, shards) -> HealData:
    """The heal corpus (stage heal-corpus) as blocks: the validation shards in order, whole batches of them; the
    training shards in one seeded permutation of their blocks, as many as heal.tokens buys. Nothing is read here:
    the blocks are read from the memory-mapped shards when a step asks for them."""
    train, validation = TokenShards(shards, "train"), TokenShards(shards, "validation")
    bos = train.settings["bos"]
    width = heal.seq_len - (bos is not None)
    validation_blocks = len(validation) // width // heal.batch_size * heal.batch_size
    if not validation_blocks:
        raise UserError(f"heal: the validation shards hold {len(validation):,} tokens, less than one batch of "
                        f"heal.batch_size={heal.batch_size} blocks of heal.seq_len={heal.seq_len}; raise "
                        "heal_corpus.validation_tokens or lower heal.batch_size")
    available = len(train) // width
    steps = plan_steps(heal, available)
    needed = steps * heal.batch_size * heal.accumulation
    # int32 where it fits: 4 bytes a block, 4 MB for a billion tokens in blocks of 1,024
    order = np.random.default_rng(heal.seed).permutation(available).astype(np.int32 if available < 2**31 else np.int64)
    return HealData(Blocks(train, heal.seq_len, bos, order, needed),
                    Blocks(validation, heal.seq_len, bos, np.arange(validation_blocks), validation_blocks),
                    steps, validation.totals["validation_texts"], available)


def check_budget(heal, pruned_dir, cut: list[int], batch_per_process: int) -> int:
    """The bytes training the pruned model takes (fp32 weights, gradients and Adam's two moments of the trainable
    weights, the activations backward keeps), from its shapes alone; a one-line UserError when that is over the
    machine's memory budget (budget.py), before a byte of the weights is read. 0 without a budget."""
    from transformers import AutoConfig, AutoModelForCausalLM

    budget = memory_budget()
    if budget is None:
        return 0
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pruned_dir), dtype=torch.float32)
    parameters = sum(p.numel() for p in skeleton.parameters())
    # LoRA's adapters are a rounding error beside the frozen weights
    trainable = 0 if heal.trainable == "lora" else sum(
        p.numel() for p in select_trainable(skeleton, heal, cut).parameters() if p.requires_grad)
    # What backward keeps, in fp32: per layer and token the inputs of its norms and projections and the
    # feed-forward's wide intermediates (8 hidden + 2 feed-forward values; sdpa keeps no attention matrix), for every
    # layer (an upper bound: nothing below the first trainable one needs them), and the logits with their softmax.
    config = skeleton.config.get_text_config()
    tokens = batch_per_process * heal.seq_len
    per_layer = 8 * config.hidden_size + 2 * feed_forward_size(config)
    activations = 4 * tokens * (per_layer * config.num_hidden_layers + 2 * config.vocab_size)
    needed = 4 * parameters + 12 * trainable + activations
    if needed > budget:
        raise UserError(
            f"heal: training this {parameters / 1e9:.3g}B-parameter model needs about {gib(needed)} (fp32 weights, "
            f"gradients and Adam moments of {trainable / 1e9:.3g}B trainable, activations), more than "
            f"{ENV_VAR}={gib(budget)}; heal.tokens: 0 releases the pruned model unhealed")
    return needed


def student_and_teacher(heal, pruned_dir, base_dir, dropped, device):
    """(model to train, teacher or None, matched states): the pruned model in fp32 master weights (on CUDA the Trainer
    computes in bf16) with only the chosen weights trainable, the frozen base model when the loss needs one (kl,
    hidden), and the (pruned, base) hidden states the `hidden` loss compares. Under a memory budget the teacher gets
    what training leaves of it (models.load_model)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    num_layers = num_layers_in(pruned_dir)
    cut = cut_layers(dropped, num_layers, heal.cut_layers)
    processes = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    batch = heal.batch_size // processes  # split_batches: each process takes its share of the global batch
    training = check_budget(heal, pruned_dir, cut, batch)
    model = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    model = select_trainable(model, heal, cut)
    teacher = None
    if heal.loss.kl or heal.loss.hidden:
        # The teacher's pass keeps nothing for backward: one batch of the training's shape, its hidden states when the
        # hidden loss reads them, logits when kl needs them
        states = num_layers_in(base_dir) + 1 if heal.loss.hidden else 0
        workload = Workload(batch * heal.seq_len, heal.seq_len, kept_states=states, logits=bool(heal.loss.kl))
        gpu = (device.index or 0) if device.type == "cuda" else None  # this process's GPU, whole, as the student's
        teacher, _ = load_model(base_dir, device.type, gpu=gpu, workload=workload, reserved=training)
        teacher.requires_grad_(False)
    return model, teacher, matched_states(dropped, num_layers, heal.cut_layers)


def heal_model(heal, launch, *, pruned_dir, base_dir, dropped, shards, checkpoints, log_dir, out_dir, device: str,
               fingerprint_inputs) -> Result:
    """Train the pruned model as heal params say and write it to out_dir (rank 0); resumes from `checkpoints`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pruned_dir)
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if context is not None and heal.seq_len > context:
        raise UserError(f"heal.seq_len={heal.seq_len} is above the model's context (max_position_embeddings={context})")
    data = training_data(heal, shards)
    steps = data.steps
    if steps == 0:
        with atomic_dir(out_dir) as tmp:  # heal.tokens = 0: the pruned model, hardlinked (no copy of the weights)
            for path in Path(pruned_dir).iterdir():
                if path.is_file():
                    link_or_copy(path, tmp / path.name)
        for empty in (checkpoints, log_dir):  # DVC outputs, even when nothing trains
            shutil.rmtree(empty, ignore_errors=True)
            Path(empty).mkdir(parents=True)
        return Result(0, 0, 0, None, {}, 0, 0.0)

    args = training_arguments(heal, launch, steps, Path(checkpoints), device)
    shortfall = data.shortfall(heal)
    if shortfall and args.process_index == 0:
        print(f"heal: the training text packs into {data.available_blocks * heal.seq_len:,} tokens, less than "
              f"heal.tokens={heal.tokens:,}: training one pass, {steps} steps ({shortfall:,} tokens short; "
              "heal.repeat: true reads the text again instead)", flush=True)
    if heal.batch_size % args.world_size:
        raise UserError(f"heal.batch_size={heal.batch_size} does not split over {args.world_size} processes")
    with args.main_process_first(local=False, desc="checkpoint fingerprint"):
        # Rank 0 hashes the inputs (recording each file's hash by its stat) and clears foreign checkpoints first; the
        # others then find every hash in the record.
        main = args.process_index == 0
        hashes = Path(checkpoints) / HASHES
        start = resume_point(Path(checkpoints), fingerprint(heal, fingerprint_inputs, hashes, record=main))
        branch = branch_step(heal, steps)
        stable = branch and branch_fingerprint(heal, steps, fingerprint_inputs, hashes, record=main)
        if start is None and branch:
            start = branch_point(branch_folder(checkpoints), stable, branch)
    args.eval_on_start = start is None  # a resumed run has the step-0 evaluation in its history already

    model, teacher, matched = student_and_teacher(heal, pruned_dir, base_dir, dropped, args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The curve is written beside the checkpoints (it is rebuilt from them on resume) and published at the end,
    # so a heal that stops on a bad loss records nothing.
    curve_dir = Path(checkpoints) / "dvclive"
    callbacks = [NonFinite(), EvaluateLast(), FirstStepCost(model, teacher, heal, steps, args.process_index != 0)]
    callbacks += [CurveLog(curve_dir)] if args.process_index == 0 else []
    callbacks += [KeepBranch(branch, branch_folder(checkpoints), stable, main)] if branch else []
    trainer = HealTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.validation,
                          heal=heal, teacher=teacher, matched=matched, callbacks=callbacks)
    check_resumable(start, launch)
    output = trainer.train(resume_from_checkpoint=start)
    history = trainer.state.log_history
    # Under FSDP every rank takes part in gathering the full weights; rank 0 receives them.
    gathered = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if args.process_index == 0:
        final = model.merge_and_unload() if heal.trainable == "lora" else model
        with atomic_dir(out_dir) as tmp:
            save_healed(final, pruned_dir, tmp, getattr(config, "dtype", None) or torch.float32, gathered)
        with atomic_dir(log_dir) as tmp:
            shutil.copytree(curve_dir, tmp, dirs_exist_ok=True)
            # DVCLive's summary keeps its keys in the order they were first logged, which differs after a resume
            # (the replayed history comes first): sorted, a resumed heal writes the same bytes as an uninterrupted one
            summary = tmp / "metrics.json"
            if summary.exists():
                summary.write_text(json.dumps(json.loads(summary.read_text()), indent=4, sort_keys=True) + "\n")
        # Checkpoints exist for a heal to resume from; a finished heal leaves the folder empty, so that the persistent
        # DVC output is the same after every finished heal and switching experiments does not make `heal` look changed.
        for entry in Path(checkpoints).iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    losses = [h["loss"] for h in history if "loss" in h]
    return Result(
        steps=steps,
        tokens=len(data.train) * heal.seq_len,
        shortfall=shortfall,
        validation_texts=data.validation_texts,
        trainable_parameters=trainable,
        train_loss=losses[-1] if losses else None,
        validation_loss={h["step"]: h["eval_loss"] for h in history if "eval_loss" in h},
        resumed_from=int(Path(start).name.split("-")[1]) if start else 0,
        train_seconds=output.metrics["train_runtime"],
        is_main_process=args.process_index == 0,
    )

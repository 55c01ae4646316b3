"""Perplexity on held-out texts through lm-evaluation-harness: a task generated from our JSONL file, scored
by lm-eval's `hf` model with disjoint rolling windows of `max_length` tokens (as its wikitext task does)."""
import json
import shutil
import time
from pathlib import Path

import yaml

from layerprune.errors import UserError

TASK_NAME = "layerprune_heldout"

# lm-eval's own metrics and aggregations, named as in its registry. Giving the aggregation and direction
# explicitly saves six "aggregation is not defined" warnings per run. Words and bytes are counted by lm-eval
# on the scored text (ConfigurableTask.count_words: whitespace split; count_bytes: UTF-8 length).
PERPLEXITY_METRICS = {
    "word_perplexity": "weighted_perplexity",
    "byte_perplexity": "weighted_perplexity",
    "bits_per_byte": "bits_per_byte",
}


def write_task(eval_texts_path: Path, task_dir: Path, task_name: str) -> None:
    """Write an lm-eval task YAML that scores every {"text": ...} line of a JSONL file."""
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    task = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(Path(eval_texts_path).resolve())},
            # datasets converts the JSONL to Arrow in its cache; keep that next to the task, not in ~/.cache.
            "cache_dir": str(task_dir / "datasets_cache"),
        },
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
            for metric, aggregation in PERPLEXITY_METRICS.items()
        ],
        "metadata": {"version": 1.0},
    }
    (task_dir / f"{task_name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def eval_workload(batch_size: int, max_length: int):
    """lm-eval's largest pass: a batch of full windows, with logits (for models.load_model's memory budget)."""
    from layerprune.budget import Workload

    return Workload(batch_size * max_length, max_length, logits=True)


def evaluate_perplexity(
    model_dir: Path, eval_texts_path: Path, *, max_length: int, batch_size: int, device: str = "cpu", work_dir: Path,
    tasks: list[str] = (), include_path: str | None = None, tokenizer=None,
) -> dict:
    """Word and byte perplexity of the model in model_dir on the held-out texts, and scoring throughput.

    model_dir may also be a model already in memory (the frontier's, with layers removed in place), with its
    tokenizer; it is scored as it is, on its own device and in its own dtype. A folder is loaded by
    models.load_model, within the machine's memory budget.

    `tasks` are more lm-eval tasks (by name, from lm-eval's registry or from the task YAMLs in include_path), scored
    in the same run with the same loaded model; their metrics come back under "tasks"."""
    if max_length <= 0:
        raise UserError(f"eval.max_length={max_length}: must be a positive number of tokens")
    if batch_size <= 0:
        raise UserError(f"eval.batch_size={batch_size}: must be at least 1")
    records, dropped = _read_texts(eval_texts_path)
    if not records:
        raise UserError(f"sample.eval: the held-out set {eval_texts_path} has no texts (dropped {dropped})")

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from layerprune.cost import Cost, forward_flops
    from layerprune.models import load_model, pick_device

    # A fresh task dir each run: the datasets cache keys on the file's path and mtime, and we want no stale copy.
    task_dir = Path(work_dir) / "lm_eval_task"
    shutil.rmtree(task_dir, ignore_errors=True)
    # Blank texts are left out: they have no token to score, but lm-eval would count each as a word.
    kept_path = task_dir / "eval_texts.jsonl"
    write_task(kept_path, task_dir, TASK_NAME)
    # Longest first: lm-eval batches windows in document order, so sorted texts put similar windows together and
    # cut padding (56% -> ~90% real tokens on the default; padding also pays for the 262k-vocabulary softmax).
    # Perplexity is a sum over texts, so the order does not change it.
    records.sort(key=lambda record: len(record["text"]), reverse=True)
    kept_path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")

    # Built-in tasks only when asked for: indexing lm-eval's thousands of task YAMLs costs seconds.
    task_manager = TaskManager(include_path=[str(task_dir), *([include_path] if include_path else [])],
                               include_defaults=bool(tasks))
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        where = f"lm-eval's registry or eval.include_path={include_path!r}" if include_path else "lm-eval's registry"
        raise UserError(f"eval.tasks: unknown task(s) {', '.join(unknown)}: not in {where}")
    device = pick_device(device)
    if isinstance(model_dir, (str, Path)):  # the one loader: within the machine's memory budget (budget.py)
        model, tokenizer = load_model(model_dir, device, workload=eval_workload(batch_size, max_length))
    else:
        model = model_dir
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        # Explicit: the default is the model's advertised context (32k for Gemma 3), far beyond what we need.
        max_length=max_length,
        batch_size=batch_size,
    )
    # lm-eval scores each text in disjoint windows of max_length tokens: the FLOPs of those windows, and the time
    # they take at the rate of lm-eval's first batch (its own progress bar shows the ETA after that)
    windows = [min(max_length, length - begin) for length in map(len, tokenizer([r["text"] for r in records]).input_ids)
               for begin in range(0, length, max_length)]
    cost = Cost("held-out perplexity", forward_flops(model, windows, head=True))
    first_call = cost.first_call(model, lambda ids: forward_flops(model, [ids.shape[-1]] * len(ids), head=True))
    start = time.perf_counter()
    with first_call:
        results = lm_eval.simple_evaluate(model=lm, tasks=[TASK_NAME, *tasks], task_manager=task_manager,
                                          log_samples=True)
    seconds = time.perf_counter() - start

    # Every token of a text is predicted exactly once (the first one from the BOS/EOS prefix), so the tokens
    # scored are the texts as lm-eval tokenised them; the logged samples hold the exact strings it scored.
    samples = results.pop("samples")[TASK_NAME]
    num_tokens = sum(len(lm.tok_encode(sample["arguments"][0][0])) for sample in samples)
    metrics = results["results"][TASK_NAME]
    return {
        **{metric: metrics[f"{metric},none"] for metric in PERPLEXITY_METRICS},
        "tasks": {task: task_scores(results["results"][task]) for task in tasks},
        "num_texts": len(samples),
        "dropped_texts": dropped,
        "num_tokens": num_tokens,
        "seconds": seconds,
        "tokens_per_second": num_tokens / seconds,
        # What is a result: lm-eval's dict less its dates, git hash, environment, timings and temp paths
        "results": json.loads(json.dumps({key: results[key] for key in RESULT_KEYS if key in results},
                                         default=handle_non_serializable)),
    }


RESULT_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")


def task_scores(task_results: dict) -> dict:
    """lm-eval's "acc,none": 0.5, "acc_stderr,none": ... -> {"acc": 0.5, "acc_stderr": ...}, numbers only."""
    return {key.split(",")[0]: value for key, value in task_results.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _read_texts(path: Path) -> tuple[list[dict], dict[str, int]]:
    """The records with a non-blank "text", and how many were dropped, by reason."""
    records, dropped = [], {"blank": 0}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"sample.eval: {path}:{number}: expected a JSON object with a string 'text'")
        if record["text"].strip():
            records.append(record)
        else:
            dropped["blank"] += 1
    return records, dropped

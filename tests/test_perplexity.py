"""lm-eval's perplexity against our own forward pass over the same rolling windows, on the real SmolLM2-135M."""
import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerprune.errors import UserError
from layerprune.perplexity import evaluate_perplexity

MAX_LENGTH = 64
TEXTS = [
    "The cat sat on the mat.",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero.",
    # Long enough for three windows of 64 tokens: a full one with one token of context, then a short last one.
    "Madrid is the capital and most populous city of Spain. The city has almost 3.4 million inhabitants and a "
    "metropolitan area population of approximately 7 million. It is the second-largest city in the European Union. "
    "The municipality covers 604.3 square kilometres. Madrid lies on the River Manzanares in the central part of the "
    "Iberian Peninsula at about 650 metres above mean sea level. Capital city of Spain since 1561, Madrid is the seat "
    "of the Spanish government, and the residence of the Spanish monarch. Madrid is also the political, economic and "
    "cultural centre of the country, and its urban area has the third-largest GDP in the European Union.\n",
    "  Leading spaces, a tab\tand a\nnewline count as word separators in lm-eval's word count.",
]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def windowed_loglikelihood(model, ids, prefix, window):
    """Sum of log p(token), each token predicted once, in windows of `window` predictions (window=None: one window
    with the whole text as context). Each window's input is the `window` tokens just before its last target: one
    token of context for a full window, more for a short last one. The prefix token predicts the first token."""
    seq = torch.tensor([prefix] + ids)
    window = window or len(ids)
    total = 0.0
    for predicted in range(0, len(ids), window):
        end = min(predicted + window, len(ids))  # this window's targets are seq[predicted + 1 : end + 1]
        start = max(0, end - window)
        with torch.no_grad():
            logprobs = model(seq[start:end][None]).logits[0].float().log_softmax(-1)
        targets = seq[predicted + 1 : end + 1]
        positions = torch.arange(predicted - start, end - start)
        total += logprobs[positions, targets].sum().item()
    return total


@pytest.fixture(scope="module")
def evaluated(smollm2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppl")
    texts_path = write_jsonl(tmp / "eval.jsonl", TEXTS)
    cwd, work_dir = tmp / "cwd", tmp / "work"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)  # anything written relative to the working directory would land here
        # A module fixture runs before conftest's per-test HF_HOME; and datasets fixes its cache path on import.
        patch.setenv("HF_HOME", str(tmp / "hf_home"))
        import datasets

        def hf_datasets_cache():
            return sorted(datasets.config.HF_DATASETS_CACHE.rglob("*"))

        before = hf_datasets_cache()
        out = evaluate_perplexity(smollm2_dir, texts_path, max_length=MAX_LENGTH, batch_size=2, work_dir=work_dir)
        after = hf_datasets_cache()
    return out, dict(cwd=cwd, work_dir=work_dir, cache_before=before, cache_after=after)


def test_agrees_with_direct_forward_pass(evaluated, smollm2_dir):
    out, _ = evaluated
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    # Only the text's own tokens are scored, the first one predicted from the BOS token (EOS when there is none).
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    token_ids = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    assert max(map(len, token_ids)) > 2 * MAX_LENGTH  # the windows really roll

    ours = sum(windowed_loglikelihood(model, ids, prefix, MAX_LENGTH) for ids in token_ids)
    num_words = sum(len(re.split(r"\s+", text)) for text in TEXTS)  # lm-eval's wikitext word count
    num_bytes = sum(len(text.encode("utf-8")) for text in TEXTS)
    theirs = -math.log(out["word_perplexity"]) * num_words

    assert theirs == pytest.approx(ours, rel=0.01)
    assert out["word_perplexity"] == pytest.approx(math.exp(-ours / num_words), rel=0.01)
    assert out["byte_perplexity"] == pytest.approx(math.exp(-ours / num_bytes), rel=0.01)
    assert out["bits_per_byte"] == pytest.approx(-ours / num_bytes / math.log(2), rel=0.01)
    # The tolerance is tight enough to tell windows of max_length from scoring each text with full context.
    full_context = sum(windowed_loglikelihood(model, ids, prefix, None) for ids in token_ids)
    assert abs(full_context - ours) > 0.01 * abs(ours)

    assert out["num_texts"] == len(TEXTS)
    assert out["num_tokens"] == sum(map(len, token_ids))
    assert out["tokens_per_second"] == pytest.approx(out["num_tokens"] / out["seconds"])
    assert out["results"]["results"]["layerprune_heldout"]["word_perplexity,none"] == out["word_perplexity"]
    json.dumps(out)


def test_writes_only_into_work_dir(evaluated):
    _, where = evaluated
    assert list(where["cwd"].iterdir()) == []
    assert where["cache_after"] == where["cache_before"]
    task_yaml = where["work_dir"] / "lm_eval_task" / "layerprune_heldout.yaml"
    assert "loglikelihood_rolling" in task_yaml.read_text()
    assert list((task_yaml.parent / "datasets_cache").rglob("*.arrow"))


@pytest.mark.parametrize(
    "texts, kwargs, param",
    [
        ([], {}, "sample.eval"),
        (["  ", ""], {}, "sample.eval"),  # only blank lines
        (TEXTS, dict(max_length=0), "eval.max_length"),
        (TEXTS, dict(max_length=-1), "eval.max_length"),
        (TEXTS, dict(batch_size=0), "eval.batch_size"),
    ],
)
def test_bad_input_is_a_user_error(tmp_path, texts, kwargs, param):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" if t.strip() else t + "\n" for t in texts))
    # No model is needed: the checks come before anything is loaded.
    with pytest.raises(UserError) as err:
        evaluate_perplexity(tmp_path, path, **{"max_length": 16, "batch_size": 1, **kwargs}, work_dir=tmp_path / "w")
    assert param in str(err.value) and "\n" not in str(err.value)


QUESTIONS = [  # (context, choices, index of the right one)
    ("The capital of France is", [" Paris", " banana", " seven"], 0),
    ("Water freezes at zero degrees", [" Celsius", " purple", " quickly"], 0),
    ("One, two, three,", [" four", " table", " Monday"], 0),
    ("The opposite of hot is", [" loud", " cold", " green"], 1),
]


def write_choice_task(folder):
    """A local multiple-choice task in lm-eval's YAML format, as a user's eval.include_path holds it."""
    folder.mkdir()
    (folder / "questions.jsonl").write_text("".join(
        json.dumps({"context": context, "choices": choices, "answer": answer}) + "\n"
        for context, choices, answer in QUESTIONS))
    (folder / "toy_choice.yaml").write_text(f"""task: toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'questions.jsonl'}
  cache_dir: {folder / 'cache'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")


def test_extra_tasks_are_scored_beside_perplexity(smollm2_dir, tmp_path):
    write_choice_task(tmp_path / "tasks")
    texts = write_jsonl(tmp_path / "eval.jsonl", TEXTS[:2])
    out = evaluate_perplexity(smollm2_dir, texts, max_length=MAX_LENGTH, batch_size=2, work_dir=tmp_path / "w",
                              tasks=["toy_choice"], include_path=str(tmp_path / "tasks"))
    # accuracy from our own forward passes: the choice with the highest log-likelihood after the context
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    right = 0
    for context, choices, answer in QUESTIONS:
        context_ids = tokenizer.encode(context)
        scores = []
        for choice in choices:
            ids = tokenizer.encode(context + choice)
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
        right += max(range(len(choices)), key=scores.__getitem__) == answer
    assert out["tasks"]["toy_choice"]["acc"] == pytest.approx(right / len(QUESTIONS))
    assert math.isfinite(out["word_perplexity"])


def test_unknown_task_is_one_line(smollm2_dir, tmp_path):
    (tmp_path / "tasks").mkdir()
    texts = write_jsonl(tmp_path / "eval.jsonl", TEXTS[:1])
    with pytest.raises(UserError, match=r"^eval.tasks: unknown task\(s\) no_such_task: not in lm-eval's registry or "
                                        r"eval.include_path="):
        evaluate_perplexity(smollm2_dir, texts, max_length=MAX_LENGTH, batch_size=2, work_dir=tmp_path / "w",
                            tasks=["no_such_task"], include_path=str(tmp_path / "tasks"))

"""The heal corpus (layerprune/heal_corpus.py): token shards made from a real JSON-lines corpus or a local folder
read by `datasets` streaming, with a word-level tokenizer (word w<i> is token i, EOS 1), so every expected stream is
written out by hand from the texts."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from layerprune.errors import UserError
from layerprune.heal_corpus import (
    Contamination, HeldOut, Manifest, TokenShards, corpus_rows, hub_rows, locate_source, prepare, token_dtype,
)
from layerprune.params import HealCorpusParams
from layerprune.tiny_models import word_tokenizer

REPO = Path(__file__).resolve().parent.parent
EOS = 1


def params(**changes) -> HealCorpusParams:
    return HealCorpusParams.model_validate({"shard_tokens": 64, "validation_texts": 2, "validation_tokens": 16,
                                            **changes})


def words(rng, low=5, high=30):
    return " ".join(f"w{rng.randrange(3, 100)}" for _ in range(rng.randrange(low, high)))


def ids(text: str) -> list[int]:
    return [int(word[1:]) for word in text.split()]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    word_tokenizer(128).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 rows, the first 3 held out; row 10 repeats held-out row 1's text under another id (and other spacing)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    rows = [{"id": f"r{i}", "text": words(rng)} for i in range(60)]
    rows[10]["text"] = "  " + rows[1]["text"].replace(" ", "   ") + " "
    rows[20]["text"] = "   "
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return root, rows


def run(source, out, corpus_dir, tokenizer_dir, rows=None):
    rows = rows or (lambda state: corpus_rows(corpus_dir / "corpus.jsonl", source.seed, state))
    return prepare(source, rows, tokenizer_dir=tokenizer_dir, held_out=HeldOut.read(corpus_dir / "eval.jsonl", 2000),
                   out_dir=out, source_id={"source": "corpus"}, progress=False)


def stream(folder, kind) -> list[int]:
    shards = TokenShards(folder, kind)
    return shards.read(0, len(shards)).tolist() if len(shards) else []


def texts_of(tokens: list[int]) -> list[tuple[int, ...]]:
    out, current = [], []
    for token in tokens:
        if token == EOS:
            out.append(tuple(current))
            current = []
        else:
            current.append(token)
    return out + ([tuple(current)] if current else [])


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def test_the_shards_hold_every_text_but_the_held_out_ones_closed_by_eos(corpus, tokenizer_dir, tmp_path):
    root, rows = corpus
    result = run(params(), tmp_path / "shards", root, tokenizer_dir)
    validation, train = stream(tmp_path / "shards", "validation"), stream(tmp_path / "shards", "train")
    expected = sorted(tuple(ids(r["text"])) for i, r in enumerate(rows) if i >= 3 and i not in (10, 20))
    assert sorted(texts_of(validation) + texts_of(train)) == expected
    assert validation[-1] == EOS and train[-1] == EOS  # whole texts
    assert len(texts_of(validation)) >= 2 and len(validation) >= 16
    assert result.totals["excluded"] == {"held_out_id": 3, "held_out_text": 1, "empty": 1}
    assert result.totals["rows_read"] == 60 and result.totals["train_tokens"] == len(train)
    assert len(list((tmp_path / "shards").glob("train-*.bin"))) == -(-len(train) // 64)  # shards of 64 tokens
    assert np.fromfile(tmp_path / "shards" / "train-00000.bin", dtype=np.uint16).tolist() == train[:64]


def test_the_order_is_seeded(corpus, tokenizer_dir, tmp_path):
    root, _ = corpus
    run(params(), tmp_path / "a", root, tokenizer_dir)
    run(params(), tmp_path / "b", root, tokenizer_dir)
    run(params(seed=1), tmp_path / "c", root, tokenizer_dir)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert stream(tmp_path / "a", "train") != stream(tmp_path / "c", "train")


def test_token_width_follows_the_vocabulary():
    assert token_dtype(65_024) == np.uint16  # Falcon
    assert token_dtype(262_144) == np.uint32  # Gemma 3


def test_a_budget_cuts_the_training_stream_and_raising_it_extends_the_same_stream(corpus, tokenizer_dir, tmp_path):
    root, _ = corpus
    whole = stream(run(params(), tmp_path / "all", root, tokenizer_dir) and tmp_path / "all", "train")
    short = run(params(tokens=150), tmp_path / "grown", root, tokenizer_dir)
    assert stream(tmp_path / "grown", "train") == whole[:150] and short.totals["train_tokens"] == 150
    longer = run(params(tokens=300), tmp_path / "grown", root, tokenizer_dir)
    assert longer.kept_shards == 3  # validation and the two whole training shards; the partial third is rewritten
    assert stream(tmp_path / "grown", "train") == whole[:300]
    run(params(tokens=300), tmp_path / "direct", root, tokenizer_dir)
    assert folder_bytes(tmp_path / "grown") == folder_bytes(tmp_path / "direct")


@pytest.mark.parametrize("damage", ["truncated", "edited", "foreign", "missing"])
def test_a_damaged_shard_is_rebuilt(corpus, tokenizer_dir, tmp_path, damage):
    root, _ = corpus
    out = tmp_path / "shards"
    run(params(), out, root, tokenizer_dir)
    original = folder_bytes(out)
    shard = out / "train-00001.bin"
    data = shard.read_bytes()
    shard.unlink()  # as DVC's hard links demand: never written in place
    if damage == "truncated":
        shard.write_bytes(data[:-2])
    elif damage == "edited":
        shard.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "foreign":
        shard.write_bytes((out / "train-00000.bin").read_bytes())
    if damage in ("truncated", "missing"):  # detected before training too, from the size alone
        with pytest.raises(UserError, match="train-00001.bin: missing or not the size"):
            TokenShards(out, "train")
    result = run(params(), out, root, tokenizer_dir)
    assert result.kept_shards == 2  # validation and train-00000
    assert folder_bytes(out) == original


def test_other_settings_start_over(corpus, tokenizer_dir, tmp_path):
    root, _ = corpus
    out = tmp_path / "shards"
    run(params(), out, root, tokenizer_dir)
    assert run(params(shard_tokens=32), out, root, tokenizer_dir).kept_shards == 0
    run(params(shard_tokens=32), tmp_path / "fresh", root, tokenizer_dir)
    assert folder_bytes(out) == folder_bytes(tmp_path / "fresh")


def test_too_little_text_for_validation_is_one_line(corpus, tokenizer_dir, tmp_path):
    root, _ = corpus
    with pytest.raises(UserError, match="not enough for heal_corpus.validation_texts=100"):
        run(params(validation_texts=100), tmp_path / "shards", root, tokenizer_dir)


def test_contamination_counts_the_held_out_13_grams_found_in_the_training_text():
    held_out = [list(range(10, 30)), list(range(40, 45))]  # 8 distinct 13-grams; the second text is too short
    training = np.array([99, 99] + list(range(10, 25)) + [99, 10, 11, 12], dtype=np.uint32)  # 15 tokens: 3 13-grams
    contamination = Contamination(held_out)
    found = contamination.found_in(training, chunk=4)  # chunks smaller than a 13-gram still see every window
    assert contamination.summary(found) == {"ngram_tokens": 13, "held_out_texts": 2, "held_out_ngrams": 8,
                                            "ngrams_found": 3, "texts_with_an_ngram_found": 1}


# ---- a hub dataset in a local folder, streamed by `datasets`; a SIGKILL midway ----


def write_folder(root: Path, files=6, rows=20) -> dict[str, list[str]]:
    rng = random.Random(2)
    texts = {}
    for index in range(files):
        name = f"part-{index}.jsonl"
        texts[name] = [words(rng) for _ in range(rows)]
        (root / name).write_text("".join(json.dumps({"id": f"{index}-{i}", "text": t}) + "\n"
                                         for i, t in enumerate(texts[name])))
    return texts


KILLER = """
import os, signal, sys
from layerprune import heal_corpus
from layerprune.heal_corpus import HeldOut, hub_rows, prepare
from layerprune.params import HealCorpusParams
heal_corpus.TOKENIZE_BATCH = 8  # shards finish before the kill (the bytes do not depend on the batch)
source = HealCorpusParams.model_validate({json})
def rows(state):
    for count, item in enumerate(hub_rows(source, None, state)):
        if count == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as a killed job gets
        yield item
prepare(source, rows, tokenizer_dir=sys.argv[1], held_out=HeldOut.read(sys.argv[2], 2000), out_dir=sys.argv[3],
        source_id={{"source": "hub"}}, progress=False)
"""


def test_a_killed_run_resumes_without_reading_a_finished_file_and_ends_with_the_same_bytes(tokenizer_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    texts = write_folder(data)
    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "none", "text": "w3 w4"}) + "\n")
    source = params(source="hub", dataset=str(data), shard_tokens=32)

    opened = []
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and opened is not None
                     and str(args[0]).startswith(str(data)) else None)

    def hub(state):
        return hub_rows(source, None, state)

    held_out = HeldOut.read(tmp_path / "eval.jsonl", 2000)
    opened.clear()
    prepare(source, hub, tokenizer_dir=tokenizer_dir, held_out=held_out, out_dir=tmp_path / "whole",
            source_id={"source": "hub"}, progress=False)
    order = list(dict.fromkeys(Path(p).name for p in opened))  # the files in stream order, as first opened
    assert sorted(order) == sorted(texts)

    script = KILLER.format(json=repr(source.model_dump()), kill_after=70)  # row 70: the 4th file of 20-row files
    killed = subprocess.run([sys.executable, "-c", script, str(tokenizer_dir), str(tmp_path / "eval.jsonl"),
                             str(tmp_path / "resumed")], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -signal.SIGKILL
    finished = Manifest.read(tmp_path / "resumed")
    assert finished is not None and not finished.done and len(finished.shards) > 2

    opened.clear()
    result = prepare(source, hub, tokenizer_dir=tokenizer_dir, held_out=held_out, out_dir=tmp_path / "resumed",
                     source_id={"source": "hub"}, progress=False)
    reopened = {Path(p).name for p in opened}
    assert not reopened & set(order[:3]), f"files finished before the kill were read again: {reopened}"
    assert result.kept_shards == len(finished.shards)
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")
    opened = None  # the audit hook stays installed (hooks cannot be removed); it does nothing from here on


def test_a_local_folder_source_is_located_by_its_files(tmp_path):
    write_folder(tmp_path, files=2, rows=2)
    source = params(source="hub", dataset=str(tmp_path), config=None)
    first = locate_source(source, "es", "20231101")
    assert first["config"] == "20231101.es" and first["resolved"].startswith("files:")
    assert locate_source(source, "es", "20231101") == first
    (tmp_path / "part-0.jsonl").write_text('{"id": "x", "text": "w5 w6 w7"}\n')
    assert locate_source(source, "es", "20231101")["resolved"] != first["resolved"]
    assert locate_source(params(), "es", "20231101") == {"source": "corpus"}

"""`dvc exp run -S lang=<code>` must run with the committed defaults for every bundled language. The stages that size
themselves from the text (sample, the heal corpus's validation texts, and the heal's step plan) are built here for
each language with the default model's tokenizer, without a forward pass: a language whose text is too short fails
here, in seconds, instead of in the heal after ten minutes of pipeline."""
import statistics

import pytest
import yaml

from conftest import REPO
from layerprune.bundled import NOT_TEXT, bundled_languages
from layerprune.errors import UserError
from layerprune.files import write_jsonl
from layerprune.heal import training_data
from layerprune.heal_corpus import HeldOut, corpus_rows, prepare
from layerprune.params import parse_params
from layerprune.texts import fetch_bundled, split_samples

DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The default model's tokenizer, read from its bundled GGUF (~30 s: gguf parses a 262k-token vocabulary)."""
    from transformers import AutoTokenizer

    from layerprune.bundled import gguf_file

    gguf = gguf_file(DEFAULTS["model"]["id"], tmp_path_factory.mktemp("gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)  # what the model stage writes to models/tokenizer
    return tokenizer, folder


@pytest.mark.parametrize("lang", bundled_languages())
def test_the_default_plan_runs_for_every_bundled_language(lang, tokenizer, tmp_path):
    params = parse_params({**DEFAULTS, "lang": lang})
    _, articles = fetch_bundled(lang)
    s = params.sample
    split = split_samples(articles, s.calibration, s.eval, s.min_chars, s.max_chars, s.seed)
    assert (len(split.calibration), len(split.eval)) == (s.calibration, s.eval)
    assert params.prune.search_texts <= s.calibration
    heal, corpus = params.heal, params.heal_corpus
    write_jsonl(tmp_path / "corpus.jsonl", articles)
    write_jsonl(tmp_path / "eval.jsonl", split.eval)
    prepare(corpus, lambda state: corpus_rows(tmp_path / "corpus.jsonl", corpus.seed, state), tokenizer=tokenizer[0],
            tokenizer_dir=tokenizer[1], held_out=HeldOut.read(tmp_path / "eval.jsonl", s.max_chars),
            out_dir=tmp_path / "shards", source_id={"source": "corpus"}, progress=False)
    data = training_data(heal, tmp_path / "shards")
    assert data.steps >= 1 and len(data.train) == data.steps * heal.batch_size * heal.accumulation
    assert len(data.validation) >= heal.batch_size and data.validation_texts >= corpus.validation_texts
    # what the stage records: trained tokens and the shortfall add up to the budget
    assert len(data.train) * heal.seq_len + data.shortfall(heal) == heal.tokens


def test_languages_whose_lines_are_not_text_are_refused_in_one_line():
    for lang, reason in NOT_TEXT.items():
        _, articles = fetch_bundled(lang)
        assert statistics.median(len(article["text"]) for article in articles) < 10, f"{lang} has text after all"
        assert lang not in bundled_languages()
        with pytest.raises(UserError) as err:
            parse_params({**DEFAULTS, "lang": lang})
        assert str(err.value) == f"params.yaml: lang={lang!r}: {reason}; use data.source=hub for its Wikipedia"
        parse_params({**DEFAULTS, "lang": lang, "data": {**DEFAULTS["data"], "source": "hub"}})  # the hub is fine


def test_the_bundled_languages_are_the_sixty_odd_of_the_packages():
    languages = bundled_languages()
    assert len(languages) >= 59 and {"es", "fr", "en", "de", "ja", "zh", "no"} <= set(languages)

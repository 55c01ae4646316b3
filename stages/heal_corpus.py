"""Stage `heal-corpus`: the heal's text as token shards (layerprune/heal_corpus.py), from the fetched corpus minus the
held-out texts, or from a hub dataset streamed. Resumes after a kill; raising heal_corpus.tokens extends the shards."""
import time

from layerprune.files import file_sha256, read_json, write_json
from layerprune.heal_corpus import HeldOut, corpus_rows, hub_rows, prepare
from layerprune.stage import run_stage, write_timing


def main(params, source, tokenizer_dir, corpus, eval_texts, shards, metrics):
    started = time.perf_counter()
    hc = params.heal_corpus
    source_id = read_json(source)
    if hc.source == "corpus":
        source_id = {**source_id, "corpus_sha256": file_sha256(corpus), "seed": hc.seed}
        rows = lambda state: corpus_rows(corpus, hc.seed, state)  # noqa: E731
    else:
        rows = lambda state: hub_rows(hc, source_id["config"], state, source_id["resolved"])  # noqa: E731
    prepared = prepare(hc, rows, tokenizer_dir=tokenizer_dir, out_dir=shards, source_id=source_id,
                       held_out=HeldOut.read(eval_texts, params.sample.max_chars))
    totals = prepared.totals
    write_json(metrics, {"source": {k: v for k, v in source_id.items() if k != "corpus_sha256"}, **totals})
    seconds = time.perf_counter() - started
    write_timing(metrics, seconds=seconds, kept_shards=prepared.kept_shards, tokens_per_second=prepared.new_tokens / seconds)


if __name__ == "__main__":
    run_stage(main, "source", "tokenizer_dir", "corpus", "eval_texts", "shards", "metrics", description=__doc__)

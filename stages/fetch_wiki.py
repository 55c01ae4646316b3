"""Stage `fetch-wiki`: Wikipedia text in the chosen language, from the bundled corpora or the hub."""
from layerprune.files import write_json
from layerprune.stage import run_stage
from layerprune.texts import fetch_bundled, fetch_hub, write_jsonl


def main(params, corpus, metrics):
    data = params.data
    if data.source == "bundled":
        name, articles = fetch_bundled(params.lang)
    else:
        name, articles = fetch_hub(data.dataset, data.snapshot, params.lang, data.max_articles)
    write_jsonl(corpus, articles)
    write_json(metrics, {
        "corpus": name,
        "lang": params.lang,
        "articles": len(articles),
        "chars": sum(len(a["text"]) for a in articles),
    })


if __name__ == "__main__":
    run_stage(main, "corpus", "metrics", description=__doc__)

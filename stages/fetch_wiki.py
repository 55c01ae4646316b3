"""Stage `fetch-wiki`: text in the chosen language, from the bundled corpora or a hub dataset (Wikipedia by default)."""
from layerprune.files import write_json, write_jsonl
from layerprune.stage import run_stage
from layerprune.texts import fetch_bundled, fetch_hub


def main(params, corpus, metrics):
    data = params.data
    if data.source == "bundled":
        name, articles = fetch_bundled(params.lang)
        hub = {}
    else:
        config = data.config or f"{data.snapshot}.{params.lang}"
        name, articles = fetch_hub(data.dataset, config, text_column=data.text_column, id_column=data.id_column,
                                   max_articles=data.max_articles, shuffle_buffer=data.shuffle_buffer, seed=data.seed)
        hub = {"dataset": data.dataset, "config": config}
    write_jsonl(corpus, articles)
    write_json(metrics, {
        "corpus": name,
        **hub,
        "lang": params.lang,
        "articles": len(articles),
        "chars": sum(len(a["text"]) for a in articles),
    })


if __name__ == "__main__":
    run_stage(main, "corpus", "metrics", description=__doc__)

"""Stage `heal-corpus-source`: what the heal corpus's source is right now (run every time, like model-source): the
commit a hub dataset's revision resolves to, or a local folder's file listing. Its output changes only when the
source does, and only then does `heal-corpus` run again."""
from layerprune.files import write_json
from layerprune.heal_corpus import locate_source
from layerprune.stage import run_stage


def main(params, source):
    write_json(source, locate_source(params.heal_corpus, params.lang, params.data.snapshot))


if __name__ == "__main__":
    run_stage(main, "source", description=__doc__)

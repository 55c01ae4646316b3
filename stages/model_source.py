"""Stage `model-source`: what model.id points at right now. DVC runs it every time (always_changed); its output
changes only when the model does (another hub commit, other package versions, replaced files in a local folder),
and only then do the `model` stage and everything after it run again."""
from layerprune.files import write_json
from layerprune.models import locate
from layerprune.stage import run_stage


def main(params, source):
    write_json(source, locate(params.model.id, params.model.revision))


if __name__ == "__main__":
    run_stage(main, "source", description=__doc__)

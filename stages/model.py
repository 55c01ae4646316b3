"""Stage `model`: make the base model a local directory that mergekit and lm-eval read like any hub model, and its
tokenizer a folder of its own (what heal-corpus depends on: a new cut or new weights do not redo the heal corpus)."""

from transformers import AutoConfig, AutoTokenizer

from layerprune.files import atomic_dir, atomic_write_text, read_json
from layerprune.models import describe, export_bundled, resolve_hub_model
from layerprune.slicing import check_sliceable
from layerprune.stage import run_stage


def main(params, source, model_dir, info, tokenizer_dir):
    source = read_json(source)
    if source["kind"] == "bundled":
        with atomic_dir(model_dir) as tmp:
            export_bundled(source["id"], tmp)
        local_dir = read_from = model_dir
    else:
        # Hub weights stay in the Hugging Face cache (pinned to the commit model-source resolved), a local folder
        # where it is: models/base only says where they are.
        local_dir = source["id"] if source["kind"] == "local" else None
        read_from = local_dir or resolve_hub_model(source["id"], source["revision"])[0]
        with atomic_dir(model_dir) as tmp:
            where = "the Hugging Face cache" if local_dir is None else "that folder"
            atomic_write_text(tmp / "README.md", f"{source['id']} at {source['revision']}: read from {where}\n")
    model_info = describe(source, local_dir=local_dir, model_dir=read_from, license=params.model.license)
    # Fail here, not after the similarity pass, if mergekit cannot slice this architecture
    check_sliceable(AutoConfig.from_pretrained(read_from))
    with atomic_dir(tokenizer_dir) as tmp:
        AutoTokenizer.from_pretrained(read_from).save_pretrained(tmp)
    model_info.save(info)


if __name__ == "__main__":
    run_stage(main, "source", "model_dir", "info", "tokenizer_dir", description=__doc__)

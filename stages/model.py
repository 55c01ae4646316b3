"""Stage `model`: make the base model a local directory that mergekit and lm-eval read like any hub model."""
from transformers import AutoConfig

from layerprune.files import atomic_dir, atomic_write_text
from layerprune.models import describe, export_bundled, resolve_hub_model
from layerprune.slicing import check_sliceable
from layerprune.stage import run_stage


def main(params, model_dir, info):
    model = params.model
    if model.id.startswith("bundled:"):
        with atomic_dir(model_dir) as tmp:
            export_bundled(model.id, tmp)
        model_info = describe(model.id, "bundled", local_dir=model_dir, model_dir=model_dir)
    else:
        # Hub weights stay in the Hugging Face cache (not the DVC cache); we pin the resolved commit instead.
        local, sha = resolve_hub_model(model.id, model.revision)
        with atomic_dir(model_dir) as tmp:
            atomic_write_text(tmp / "README.md", f"{model.id}@{sha} lives in the Hugging Face cache: {local}\n")
        model_info = describe(model.id, sha, local_dir=None, model_dir=local)
    # Fail here, not after the similarity pass, if mergekit cannot slice this architecture
    check_sliceable(AutoConfig.from_pretrained(model_info.model_dir()))
    model_info.save(info)


if __name__ == "__main__":
    run_stage(main, "model_dir", "info", description=__doc__)

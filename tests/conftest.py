import os
import sys
from pathlib import Path

import pytest

# Tests never wait on the network, and never write into the user's HF cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


@pytest.fixture(autouse=True)
def _private_hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The bundled SmolLM2-135M exported to safetensors once per test session (~20 s): a real model and tokenizer."""
    from layerprune.models import export_bundled

    out = tmp_path_factory.mktemp("smollm2")
    export_bundled("bundled:smollm2-135m", out)
    return out

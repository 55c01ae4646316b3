import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never wait on the network, and never write into the user's HF cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Set at import, before any fixture runs: nothing a test does may land in the user's HF cache.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="layerprune-test-hf-")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The bundled SmolLM2-135M exported to safetensors once per test session (~20 s): a real model and tokenizer."""
    from layerprune.models import export_bundled

    out = tmp_path_factory.mktemp("smollm2")
    export_bundled("bundled:smollm2-135m", out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny matmuls
    gain nothing from threads, and on a busy machine every thread barrier waits for a time slice."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    """The end-to-end module first. `make test` runs two workers, each taking one file at a time in this order
    (--dist loadfile --no-loadscope-reorder): one worker spends the whole run on that module, the other on all the
    rest. Left last, it would run alone at the end."""
    items.sort(key=lambda item: item.path.name != "test_pipeline.py")


def pytest_sessionfinish(session):
    import shutil

    shutil.rmtree(os.environ["HF_HOME"], ignore_errors=True)

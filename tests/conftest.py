import pytest

from tests.tiny import CONFIGS, write_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, transformers model with the same weights), written once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = write_checkpoint(tmp_path_factory.mktemp(name), CONFIGS[name])
        return cache[name]
    return get

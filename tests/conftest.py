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


@pytest.fixture(scope="session")
def mtp_checkpoint(tmp_path_factory):
    """The V3-like tiny checkpoint with a random MTP module at layer index num_hidden_layers."""
    from tests.tiny import add_mtp_shard
    path, ref = write_checkpoint(tmp_path_factory.mktemp("v3-mtp"), CONFIGS["v3"])
    add_mtp_shard(path, ref)
    return path

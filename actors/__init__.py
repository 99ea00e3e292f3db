"""Everything that runs on Ray: expert groups, attention shards, the transport between them, the launcher, and
the `moeserve` command line. The only folder that imports ray; importing it does not start Ray."""


def __getattr__(name):
    if name == "Cluster":  # lazily, so `moeserve --help` and the CLI's non-Ray commands never import ray
        from .cluster import Cluster
        return Cluster
    raise AttributeError(name)

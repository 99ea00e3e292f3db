"""Errors a user can act on. Each message names the file, key or value at fault and what to do."""


class MoeserveError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(MoeserveError):
    """A model config.json that moeserve cannot serve: unknown model_type, missing key, bad shape."""


class CheckpointError(MoeserveError):
    """A checkpoint directory or safetensors file that cannot be read."""


class InputError(MoeserveError):
    """A request that cannot be served as given (empty prompt, token id out of the vocabulary, ...)."""

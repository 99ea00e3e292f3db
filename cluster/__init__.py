"""The control plane: engine, scheduler, block manager, sampling parameters, tokenizer; no Ray here."""
from .engine import Engine, EngineConfig, RequestOutput
from .llm import DEMO_MODEL, DEMO_MODEL_FP8, LLM
from .sampling_params import SamplingParams

__all__ = ["ClusterConfig", "LLM", "SamplingParams", "Engine", "EngineConfig", "RequestOutput", "DEMO_MODEL", "DEMO_MODEL_FP8"]


def __getattr__(name: str):
    # the cluster's config needs pydantic and PyYAML; the engine alone (LLM on a GPU box) needs neither
    if name == "ClusterConfig":
        from .config import ClusterConfig
        return ClusterConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The control plane: engine, scheduler, block manager, sampling parameters, tokenizer; no Ray here."""
from .config import ClusterConfig
from .engine import Engine, EngineConfig, RequestOutput
from .llm import DEMO_MODEL, DEMO_MODEL_FP8, LLM
from .sampling_params import SamplingParams

__all__ = ["ClusterConfig", "LLM", "SamplingParams", "Engine", "EngineConfig", "RequestOutput", "DEMO_MODEL", "DEMO_MODEL_FP8"]

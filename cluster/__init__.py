"""The control plane: engine, scheduler, block manager, sampling parameters, tokenizer; no Ray here."""
from .engine import Engine, EngineConfig, RequestOutput
from .llm import DEMO_MODEL, DEMO_MODEL_FP8, LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "Engine", "EngineConfig", "RequestOutput", "DEMO_MODEL", "DEMO_MODEL_FP8"]

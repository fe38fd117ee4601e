"""minikv: bounded-memory inference for Llama- and Qwen-family LLMs.

    from minikv import Engine, SamplingParams
    engine = Engine(budget=1024)                     # SmolLM2-135M-Instruct by default
    print(engine.generate("Hi!", SamplingParams(max_tokens=16))[0].text)
"""

from .engine import Engine, RequestOutput
from .errors import ConfigError, InvalidRequestError, MiniKVError, ModelLoadError
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["Engine", "RequestOutput", "SamplingParams", "MiniKVError", "ConfigError", "InvalidRequestError",
           "ModelLoadError"]

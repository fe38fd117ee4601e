"""minikv: bounded-memory inference for Llama- and Qwen-family LLMs.

    from minikv import Engine, SamplingParams
    engine = Engine(budget=1024)                     # SmolLM2-135M-Instruct by default
    out = engine.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=16))[0]
    print(out.outputs[0].text)
"""

from .engine import Engine
from .errors import ConfigError, InvalidRequestError, MiniKVError, ModelLoadError, SessionFileError
from .offline import RequestStream
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = ["Engine", "RequestStream", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics",
           "SamplingParams", "RequestOutputKind", "MiniKVError", "ConfigError", "InvalidRequestError", "ModelLoadError",
           "SessionFileError"]

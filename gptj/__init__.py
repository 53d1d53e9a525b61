"""GPT-J Studio: run GPT-J (and the bundled SmolLM2) on your own machine."""

from gptj.api import Model, load, sampling_params
from gptj.errors import InvalidRequest, ModelLoadError, ModelTooLarge
from gptj.runtime.engine import Completion
from gptj.runtime.sampling import SamplingParams
from gptj.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "Completion",
    "InvalidRequest",
    "Model",
    "ModelLoadError",
    "ModelTooLarge",
    "SamplingParams",
    "Tokenizer",
    "load",
    "load_tokenizer",
    "sampling_params",
]
__version__ = "0.1.0"

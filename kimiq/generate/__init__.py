"""Generation: sampling (pure functions), the token-id engine, and the text / chat layer.

    from kimiq.generate import SamplingParams, generate_tokens, generate_text, ChatSession

``sampling`` and ``engine`` know nothing about text; ``text`` adds the tokenizer on top.
"""

from kimiq.generate.engine import FINISH_LENGTH, FINISH_STOP, GenerationStats, Step, generate_tokens, prefill
from kimiq.generate.sampling import SamplingParams, apply_repetition_penalty, make_generator, sample
from kimiq.generate.text import FINISH_STOP_STRING, ChatSession, GenerationResult, default_stop_ids, generate_text

__all__ = [
    "SamplingParams",
    "apply_repetition_penalty",
    "sample",
    "make_generator",
    "GenerationStats",
    "Step",
    "generate_tokens",
    "prefill",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "FINISH_STOP_STRING",
    "GenerationResult",
    "generate_text",
    "default_stop_ids",
    "ChatSession",
]

"""kimiq: run Kimi-Linear (KDA + MLA mixture-of-experts) models in PyTorch.

    from kimiq import load
    model, tokenizer = load("path/to/Kimi-Linear-48B-A3B-Instruct")
    logits = model(input_ids)            # [B, T, vocab]

Importing kimiq imports torch only: no device probing, no kernel loading, no env reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "default_model_path"]

if TYPE_CHECKING:  # pragma: no cover
    from kimiq.model.model import KimiLinearForCausalLM
    from kimiq.tokenizer import Tokenizer


def default_model_path() -> Path:
    """Where the embedded default model ships inside the package."""
    return Path(__file__).parent / "assets" / "default"


def load(path: str | Path | None = None, **kwargs: Any) -> "tuple[KimiLinearForCausalLM, Tokenizer]":
    """Load a Kimi-Linear checkpoint directory (HF layout) and its tokenizer.

    ``path=None`` loads the embedded default model.  ``kwargs`` go to
    ``kimiq.model.weights.load_model`` (``dtype``, ``device``, ``kda_impl``).
    """
    from kimiq.model.weights import load_model
    from kimiq.tokenizer import Tokenizer

    if path is None:
        path = default_model_path()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded default model is not in this install ({path}); pass a checkpoint directory"
            )
    model = load_model(path, **kwargs)
    return model, Tokenizer.from_dir(path)

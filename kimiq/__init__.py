"""kimiq: run Kimi-Linear (KDA + MLA mixture-of-experts) models in PyTorch.

Importing kimiq imports torch only: no device probing, no kernel loading, no env reads.
"""

__version__ = "0.1.0"

"""MPT suite: reproducible Model Phase Transition experiments for LLM compression."""

from mpt_utils.errors import MPTError

__version__ = "0.1.0"
__all__ = ["MPTError", "__version__"]

"""MPT suite: reproducible Model Phase Transition experiments for LLM compression."""

# first: it silences tqdm's "IProgress not found" warning before any library imports tqdm.auto
from mpt_utils import progress as _progress  # noqa: F401
from mpt_utils.errors import MPTError

__version__ = "0.1.0"
__all__ = ["MPTError", "__version__"]

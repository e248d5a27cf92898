"""cfs_lightning: fine-tune a language model without losing what it already knew.

Context-free synthetic (CFS) replay samples whole sequences from the frozen base model starting
from the start token alone and adds their all-token NLL to the fine-tuning loss, a Monte Carlo
estimate of KL(p_base || p_theta) (arXiv 2505.13811).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cfs_lightning")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

"""Moved: the bank is `noiseclr.bank` (its own package, below discovery in the stage order).
This name keeps scripts written against earlier releases working."""

import warnings

from noiseclr.bank import *  # noqa: F403
from noiseclr.bank import DirectionBank, merge_banks, subset  # noqa: F401
from noiseclr.discovery.initial import init_directions, vocab_norm  # noqa: F401

warnings.warn("noiseclr.discovery.bank moved to noiseclr.bank", DeprecationWarning, stacklevel=2)

"""Moved: the bank is `noiseclr.bank` (its own package, below discovery in the stage order).
This name keeps old imports working; `edit_defaults` and `scores` are typed records now (read
them through the bank's accessors, or `.dump()` for the bank.json form)."""

import warnings

from noiseclr.bank import *  # noqa: F403
from noiseclr.bank import DirectionBank, merge_banks, subset  # noqa: F401
from noiseclr.bank.combine import SHARED_KEYS  # noqa: F401
from noiseclr.bank.record import FORMAT_VERSION, SAFE_TOKEN  # noqa: F401
from noiseclr.discovery.initial import init_directions, vocab_norm  # noqa: F401
from noiseclr.errors import BankError  # noqa: F401

warnings.warn("noiseclr.discovery.bank moved to noiseclr.bank", DeprecationWarning, stacklevel=2)

"""The direction bank: the typed record (`record`), its measured parts (`schema`), and banks
put together (`combine`). Card and export read banks; nothing here imports them."""

from noiseclr.bank.combine import merge_banks, subset
from noiseclr.bank.record import DIRECTIONS_FILE, META_FILE, SAFE_NAME, DirectionBank
from noiseclr.bank.schema import DirectionScore, EditDefaults, Scores, SignFigures

__all__ = [
    "DIRECTIONS_FILE",
    "META_FILE",
    "SAFE_NAME",
    "DirectionBank",
    "DirectionScore",
    "EditDefaults",
    "Scores",
    "SignFigures",
    "merge_banks",
    "subset",
]

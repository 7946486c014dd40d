"""Russian in Latin letters, so that English and Russian share one alphabet and a BPE's subword tokens.

A byte-level BPE trained on English and Cyrillic Russian gives Russian tokens of its own (no Cyrillic byte pair
ever occurs in English), so each language lives in embedding and unembedding rows that only it trains: a side
channel that no routing of the transformer blocks touches. Written in Latin letters, Russian shares letters,
letter pairs and many short subwords with English (as Spanish does), and only frequency tells the languages'
tokens apart.

The scheme is the common English-style romanisation (close to BGN/PCGN without diacritics): ж zh, х kh,
ц ts, ч ch, ш sh, щ shch, ю yu, я ya, ё yo, й / ы y, э e, ь ', ъ dropped. A capital letter becomes a capital
followed by lower case (Ж -> Zh), which is how names are written. Other characters pass through unchanged.
"""

from __future__ import annotations

__all__ = ["ROMANISATION", "transliterate"]

#: Lower-case Cyrillic letter -> its Latin spelling.
ROMANISATION: dict[str, str] = {
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "yo", "ж": "zh", "з": "z", "и": "i",
    "й": "y", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r", "с": "s", "т": "t",
    "у": "u", "ф": "f", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh", "щ": "shch", "ъ": "", "ы": "y", "ь": "'",
    "э": "e", "ю": "yu", "я": "ya",
}  # fmt: skip
_TABLE = str.maketrans(
    ROMANISATION | {upper: ROMANISATION[lower].capitalize() for lower in ROMANISATION if (upper := lower.upper())}
)


def transliterate(text: str) -> str:
    """``text`` with every Russian Cyrillic letter romanised (module docstring); other characters unchanged.

    Example::

        >>> transliterate("Жила-была девочка Юля.")
        "Zhila-byla devochka Yulya."
    """
    return text.translate(_TABLE)

"""Where the experiments' data is: the files this package carries, found from any working directory.

The carried data (MNIST, a CIFAR-10 subset, TinyStories samples in English and Russian, the GPT-2 tokenizer; each
folder with a README giving origin, licence and checksums) is package data under ``gradroute_experiments/data/``.
Every data argument of the experiments (``data_dir``, ``tokenizer``, ``data_files``, ``forget_corpus``...) takes

* ``None``: the argument's carried default;
* ``"carried:<path>"``: a path inside the carried data, e.g. ``"carried:tinystories/tinystories_valid_sample.txt"``
  (what the recipes use, so they run from any working directory);
* anything else: an ordinary path, relative to the working directory or absolute (your own copy of the data).

Example::

    >>> data_path("carried:mnist").name
    'mnist'
    >>> data_path(None, default="mnist") == data_path("carried:mnist")
    True
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CARRIED", "DATA_DIR", "data_path"]

#: The folder of the carried data.
DATA_DIR = Path(__file__).resolve().parent / "data"
#: The prefix that makes a data argument a path inside :data:`DATA_DIR`.
CARRIED = "carried:"


def data_path(spec: str | Path | None, default: str | None = None) -> Path:
    """The path a data argument names (see the module docstring); ``default`` is the carried path for ``None``."""
    if spec is None:
        if default is None:
            raise ValueError("data_path: no path given and no carried default")
        spec = CARRIED + default
    text = str(spec)
    if text.startswith(CARRIED):
        return DATA_DIR / text[len(CARRIED) :]
    return Path(text)

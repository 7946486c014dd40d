"""Tokenizers of the language experiments: ``<|endoftext|>``, the one special token every text data module relies
on (story separator, right padding), and :func:`load_tokenizer` (a BPE trained on the stories, a tokenizer file the
project carries, or a Hub tokenizer)."""

from __future__ import annotations

import gzip
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gradroute_experiments.datafiles import data_path

__all__ = ["EOS_TEXT", "load_tokenizer"]

EOS_TEXT = "<|endoftext|>"


def load_tokenizer(spec: str, stories: Sequence[str] = (), bpe_vocab_size: int = 4096) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as a special token.

    Args:
        spec: ``"bpe"`` trains a byte-level BPE of ``bpe_vocab_size`` tokens on ``stories`` (deterministic,
            about 1 s for the carried sample); ``"hf:<repo>"`` loads a Hub tokenizer (``"hf:Qwen/Qwen2-0.5B"``,
            online or cached); anything else is the path of a tokenizer JSON file, gzipped or not
            (``carried:gpt2-tokenizer/tokenizer.json.gz`` is the GPT-2 / GPT-Neo tokenizer, see
            :mod:`gradroute_experiments.datafiles`).
    """
    if spec == "bpe":
        if not stories:
            raise ValueError("load_tokenizer: training a BPE needs stories")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=bpe_vocab_size,
            special_tokens=[EOS_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(stories, trainer)
        return tokenizer
    if spec.startswith("hf:"):
        tokenizer = Tokenizer.from_pretrained(spec[3:])  # from the Hugging Face Hub (or its local cache)
    else:
        path = data_path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {spec!r} is neither 'bpe', 'hf:<repo>' nor a tokenizer JSON file")
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    if tokenizer.token_to_id(EOS_TEXT) is None:
        raise ValueError(f"tokenizer {spec!r} has no {EOS_TEXT!r} token")
    return tokenizer

"""Web text for the paper-scale language recipes: a corpus streamed with ``datasets``, packed, routed per token.

The paper's steering-scalar and virology models train on FineWeb-Edu (billions of tokens) read as one token
stream. :class:`WebTextDataModule` streams the documents (``datasets.load_dataset(..., streaming=True)``; nothing
is downloaded up front), tokenises them on the fly, joins them with ``<|endoftext|>`` and cuts the stream into
rows of ``max_tokens`` tokens. Every training batch carries per-token routing labels from a token set
(:class:`~lightning_gradroute.text_labels.TokenSetLabels`, keyed by the next token): 1 where the next token is one
of ``route_tokens``, 0 elsewhere. Token ids are int64 throughout (the reference code stored Qwen2's 151,936-token
vocabulary as uint16, corrupting every id above 65,535).

A **forget corpus** (the virology recipe: WMDP's bio forget corpus, a ``.jsonl`` with a ``text`` field, or a
``.txt`` of documents separated by ``<|endoftext|>`` lines) is mixed into the stream: after shuffling with
``seed``, its first documents are held out (forget test set, retraining pool) and the rest are inserted after every
``forget_every`` web documents, each ``forget_copies`` times in all (the paper: 5 copies in FineWeb-Edu).

Held-out sets, one document per row (``<|endoftext|>`` + document, at most ``max_tokens`` tokens), come from the
head of the stream, which training skips: ``splits.retain_val`` (validation and retain test set), ``retain_pool``,
``coherence_train`` and ``coherence_val`` from web documents; ``forget_val`` and ``attack_pool`` from the forget
corpus. They have the shape the evaluations expect (:class:`~gradroute_experiments.text.stories.StorySplits`,
batched by :class:`~gradroute_experiments.text.stories.StoryBatches` like the story data modules' sets);
``splits.train`` is empty because training streams.

Under DDP each rank reads its own part of the stream (``datasets.distributed.split_dataset_by_node``) and of the
forget corpus; DataLoader workers split a rank's part further.

Offline (tests, smoke runs) any local file works through a ``datasets`` builder: ``dataset_id="text"``,
``dataset_config=None``, ``data_files="carried:tinystories/tinystories_valid_sample.txt"``.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from gradroute_experiments.datafiles import data_path
from gradroute_experiments.text.checks import require_ints
from gradroute_experiments.text.stories import StoryBatches, StorySplits, read_stories
from gradroute_experiments.text.tokenizer import load_tokenizer
from lightning_gradroute.text_labels import TokenSetLabels

__all__ = ["WebTextDataModule", "read_documents"]


def read_documents(path: str | Path, text_column: str = "text") -> list[str]:
    """The documents of a ``.jsonl`` file (field ``text_column`` of each line) or of a ``.txt`` file whose documents
    are separated by lines equal to ``<|endoftext|>``; blank documents are dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_documents: {path} does not exist")
    if path.suffix == ".txt":
        return read_stories(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"read_documents: {path} is neither .jsonl nor .txt")
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if text_column not in record:
            raise ValueError(f"read_documents: line {number} of {path} has no {text_column!r} field ({sorted(record)})")
        if str(record[text_column]).strip():
            documents.append(str(record[text_column]).strip())
    return documents


class _PackedStream(torch.utils.data.IterableDataset):
    """The training stream of a :class:`WebTextDataModule`: web documents with forget documents mixed in, packed."""

    def __init__(self, module: WebTextDataModule, forget_train: list[list[int]]) -> None:
        self.module = module
        self.forget_train = forget_train

    def _documents(self) -> Iterator[list[int]]:
        module, hp = self.module, self.module.hparams
        rank, world = module.rank_and_world()
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        web = module.web_stream(skip=module.num_held_out_web, rank=rank, world=world)
        web = itertools.islice(web, worker_id, None, workers)
        mine = self.forget_train[rank * workers + worker_id :: world * workers]
        copies = []
        for copy in range(hp.forget_copies if mine else 0):
            order = list(range(len(mine)))
            random.Random(hp.seed * 1000 + copy).shuffle(order)
            copies += [mine[i] for i in order]
        forget = iter(copies)
        for count, text in enumerate(web, start=1):
            yield module.tokenizer.encode(text, add_special_tokens=False).ids
            if count % hp.forget_every == 0:
                inserted = next(forget, None)
                if inserted is not None:
                    yield inserted

    def __iter__(self) -> Iterator[dict[str, Any]]:
        length, eos = self.module.hparams.max_tokens, self.module.eos_id
        buffer: list[int] = []
        for ids in self._documents():
            buffer += [eos, *ids]
            while len(buffer) >= length:
                yield {"ids": buffer[:length], "forget": False, "labelled": False}
                del buffer[:length]


class WebTextDataModule(StoryBatches, pl.LightningDataModule):
    """A streamed text corpus (FineWeb-Edu by default), packed into rows, with a routed token set (module docstring).

    Example (the steering-scalar recipe's data)::

        dm = WebTextDataModule(route_tokens=[" California"])   # the carried GPT-2 tokenizer
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))     # input_ids (12, 1024), route_labels (12, 1023)

    Args:
        dataset_id: a Hugging Face dataset id, or a ``datasets`` builder (``"text"``, ``"json"``) for local files.
        dataset_config: the dataset's config (FineWeb-Edu: ``"sample-10BT"``, ``"sample-100BT"``); None for none.
        data_files: the files of a builder such as ``"text"`` or ``"json"`` (``carried:`` paths allowed,
            :mod:`gradroute_experiments.datafiles`).
        split: the split to stream.
        text_column: the documents' text field (also of a ``.jsonl`` forget corpus).
        tokenizer: a tokenizer JSON path (``.gz`` allowed; default the carried GPT-2 one) or ``"hf:<repo>"`` (``Tokenizer.from_pretrained``, online:
            ``"hf:Qwen/Qwen2-0.5B"``); it must have ``<|endoftext|>``.
        max_tokens: tokens per training row (and the cut of a held-out document).
        batch_size: rows per batch.
        route_tokens: the routed tokens as text, each exactly one token (``" California"``).
        forget_corpus: a ``.jsonl`` / ``.txt`` file of forget documents, or None.
        forget_copies: how many times each training forget document is inserted into the stream.
        forget_every: insert one forget document after every this many web documents.
        num_val_documents: held-out web documents for validation and the retain test set.
        num_retain_pool_documents: held-out web documents that retraining on the retain side trains on.
        num_coherence_documents, num_coherence_val_documents: held-out web documents for the coherence fine-tune
            and its best-step selection.
        num_forget_val_documents: held-out forget documents (the forget test set).
        num_attack_documents: held-out forget documents that retraining on the forget side trains on.
        seed: the forget corpus's split and insertion order.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        dataset_id: str = "HuggingFaceFW/fineweb-edu",
        dataset_config: str | None = "sample-10BT",
        data_files: str | None = None,
        split: str = "train",
        text_column: str = "text",
        tokenizer: str = "carried:gpt2-tokenizer/tokenizer.json.gz",
        max_tokens: int = 1024,
        batch_size: int = 12,
        route_tokens: Sequence[str] = (),
        forget_corpus: str | None = None,
        forget_copies: int = 5,
        forget_every: int = 100,
        num_val_documents: int = 1000,
        num_retain_pool_documents: int = 0,
        num_coherence_documents: int = 0,
        num_coherence_val_documents: int = 0,
        num_forget_val_documents: int = 0,
        num_attack_documents: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(route_tokens, str) or not route_tokens:
            raise ValueError(f"WebTextDataModule: route_tokens must be a non-empty list of texts, got {route_tokens!r}")
        require_ints(
            "WebTextDataModule",
            {  # argument: (value, smallest allowed)
                "max_tokens": (max_tokens, 2),
                "batch_size": (batch_size, 1),
                "forget_copies": (forget_copies, 1),
                "forget_every": (forget_every, 1),
                "num_val_documents": (num_val_documents, 1),
                "num_retain_pool_documents": (num_retain_pool_documents, 0),
                "num_coherence_documents": (num_coherence_documents, 0),
                "num_coherence_val_documents": (num_coherence_val_documents, 0),
                "num_forget_val_documents": (num_forget_val_documents, 0),
                "num_attack_documents": (num_attack_documents, 0),
            },
        )
        if forget_corpus is None and (num_forget_val_documents or num_attack_documents):
            raise ValueError("WebTextDataModule: num_forget_val_documents / num_attack_documents need a forget_corpus")
        if forget_corpus is not None and not data_path(forget_corpus).is_file():
            raise FileNotFoundError(
                f"WebTextDataModule: forget_corpus {forget_corpus!r} does not exist (see the recipe's README for how "
                "to obtain it)"
            )
        if not tokenizer.startswith("hf:") and not data_path(tokenizer).is_file():
            raise FileNotFoundError(f"WebTextDataModule: tokenizer {tokenizer!r} is neither 'hf:<repo>' nor a file")
        self.save_hyperparameters()
        self.tokenizer = None
        self.splits: StorySplits | None = None
        self.label_source: TokenSetLabels | None = None
        self.route_token_ids: list[int] = []
        self._forget_train: list[list[int]] = []

    # ----------------------------------------------------------------- stream
    @property
    def num_held_out_web(self) -> int:
        hp = self.hparams
        return (
            hp.num_val_documents
            + hp.num_retain_pool_documents
            + hp.num_coherence_documents
            + hp.num_coherence_val_documents
        )

    def rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the world size (0, 1 outside distributed training)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def web_stream(self, skip: int = 0, rank: int = 0, world: int = 1) -> Iterator[str]:
        """The web documents' texts in stream order after the first ``skip``, rank ``rank``'s part of them."""
        import datasets  # only needed here

        hp = self.hparams
        stream = datasets.load_dataset(
            hp.dataset_id, hp.dataset_config, data_files=None if hp.data_files is None else str(data_path(hp.data_files)), split=hp.split, streaming=True
        ).skip(skip)
        if world > 1:
            stream = datasets.distributed.split_dataset_by_node(stream, rank=rank, world_size=world)
        for record in stream:
            if hp.text_column not in record:
                raise ValueError(f"WebTextDataModule: the dataset has no {hp.text_column!r} column ({sorted(record)})")
            text = str(record[hp.text_column]).strip()
            if text:
                yield text

    @override
    def setup(self, stage: str) -> None:
        if self.splits is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        self.route_token_ids = [self.single_token(text, "route_tokens entry") for text in hp.route_tokens]
        self.label_source = TokenSetLabels(self.route_token_ids)
        web = list(itertools.islice(self.web_stream(), self.num_held_out_web))
        if len(web) < self.num_held_out_web:
            raise ValueError(
                f"WebTextDataModule: the stream has {len(web)} documents, held-out sets need {self.num_held_out_web}"
            )
        forget_held: list[list[int]] = []
        if hp.forget_corpus is not None:
            documents = read_documents(data_path(hp.forget_corpus), hp.text_column)
            random.Random(hp.seed).shuffle(documents)
            need = hp.num_forget_val_documents + hp.num_attack_documents
            if len(documents) <= need:
                raise ValueError(
                    f"WebTextDataModule: the forget corpus has {len(documents)} documents; {need} are held out and at "
                    "least one must remain for training"
                )
            forget_held = self.encode(documents[:need], hp.max_tokens)
            trained = self.tokenizer.encode_batch(documents[need:], add_special_tokens=False)
            self._forget_train = [e.ids for e in trained]
        sizes = (hp.num_val_documents, hp.num_retain_pool_documents, hp.num_coherence_documents)
        ends = list(itertools.accumulate((*sizes, hp.num_coherence_val_documents)))
        retain_held = self.encode(web, hp.max_tokens)
        self.splits = StorySplits(
            train=[],
            train_forget=[],
            train_labelled=[],
            retain_val=retain_held[: ends[0]],
            retain_pool=retain_held[ends[0] : ends[1]],
            coherence_train=retain_held[ends[1] : ends[2]],
            coherence_val=retain_held[ends[2] : ends[3]],
            forget_val=forget_held[: hp.num_forget_val_documents],
            attack_pool=forget_held[hp.num_forget_val_documents :],
        )

    @override
    def route_labels(self, batch: dict[str, Tensor]) -> Tensor:
        assert self.label_source is not None
        return self.label_source(batch)

    @override
    def train_dataloader(self) -> DataLoader:
        self._require_splits()
        return DataLoader(
            _PackedStream(self, self._forget_train),
            batch_size=self.hparams.batch_size,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )

    def summary(self) -> dict[str, Any]:
        """The held-out set sizes and the routed tokens (for results.json)."""
        splits = self._require_splits()
        assert self.tokenizer is not None
        return {
            "dataset": f"{self.hparams.dataset_id} {self.hparams.dataset_config or ''}".strip(),
            "forget_corpus": self.hparams.forget_corpus,
            "forget_training_documents": len(self._forget_train),
            "retain_val_documents": len(splits.retain_val),
            "forget_val_documents": len(splits.forget_val),
            "attack_pool_documents": len(splits.attack_pool),
            "retain_pool_documents": len(splits.retain_pool),
            "vocab_size": self.vocab_size,
            "routed_tokens": [{"id": t, "text": self.tokenizer.decode([t])} for t in self.route_token_ids],
        }

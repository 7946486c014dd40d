"""The text layer the language experiments (TinyStories, two-language, steering, token unlearning) stand on.

* :mod:`~gradroute_experiments.text.tokenizer`: ``<|endoftext|>`` and :func:`load_tokenizer` (a trained BPE, a
  carried tokenizer file or a Hub tokenizer);
* :mod:`~gradroute_experiments.text.stories`: reading stories, label noise, packing, the split sets
  (:class:`StorySplits`) and the batching every text data module shares (:class:`StoryBatches`);
* :mod:`~gradroute_experiments.text.story_module`: :class:`StoryDataModule`, stories with forget flags turned into
  training stories and held-out sets (TinyStories and two-language build on it);
* :mod:`~gradroute_experiments.text.web_text`: a streamed web corpus, packed, with a routed token set;
* :mod:`~gradroute_experiments.text.causal_lm`: :class:`CausalLM`, any Hugging Face causal LM as a routed
  LightningModule, with its evaluation losses and coherence fine-tune.

It is a shared layer of the import contract (``[tool.importlinter]`` in ``pyproject.toml``): it imports no
experiment, and experiments share text code only through it.
"""

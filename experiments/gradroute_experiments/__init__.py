"""The paper's experiments, one sub-package each (model, data, evaluation), driven by the recipes in ``recipes/``."""

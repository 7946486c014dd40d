"""Label sources: reading labels from dict / tuple batches, and configuring a LabelSource class from YAML."""

from __future__ import annotations

import doctest
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gradroute import BatchKey, GradientRoutingCallback, LabelSource
from lightning_gradroute.cli import GradrouteCLI


def test_batch_key_reads_dicts_and_tuples() -> None:
    labels = torch.tensor([0, 1])
    assert BatchKey("route_labels")({"x": 1, "route_labels": labels}) is labels
    assert BatchKey(2)((torch.zeros(2), torch.zeros(2), labels)) is labels
    batch = {"x": 1, "route_labels": labels}
    assert BatchKey("route_labels", remove=True)(batch) is labels
    assert "route_labels" not in batch  # so `model(**batch)` does not see it


@pytest.mark.parametrize(
    ("key", "batch", "message"),
    [
        ("labels", {"x": 1}, r"batch has no key 'labels' \(keys: \['x'\]\)"),
        (3, (1, 2), r"batch has 2 elements, no index 3"),
        ("labels", (1, 2), r"cannot take 'labels' from a batch of type tuple"),
    ],
)
def test_batch_key_errors_name_the_key(key: str | int, batch: object, message: str) -> None:
    with pytest.raises(KeyError, match=message):
        BatchKey(key)(batch)


def test_batch_key_rejects_bad_key_eagerly() -> None:
    with pytest.raises(ValueError, match="key must be a str or an int"):
        BatchKey(1.5)  # type: ignore[arg-type]


def test_label_source_is_configurable_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["gradroute"])
    config = tmp_path / "c.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: lightning_gradroute.GradientRoutingCallback
      init_args:
        targets: {hidden: {modules: net.0}}
        routes: [{label: forget, target: hidden, weights: {"0:32": 0.0}}]
        label_source: {class_path: lightning_gradroute.labels.BatchKey, init_args: {key: 2}}
model: {class_path: gradroute_experiments.toy.TwoTaskRegressor}
data: {class_path: gradroute_experiments.toy.TwoTaskData}
"""
    )
    cli = GradrouteCLI(args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GradientRoutingCallback)]
    assert isinstance(callback.label_source, LabelSource) and callback.label_source.key == 2


def test_callback_rejects_a_non_callable_label_source() -> None:
    from lightning_gradroute import Route, Target

    with pytest.raises(ValueError, match="label_source 3 is not callable"):
        GradientRoutingCallback({"t": Target("x")}, [Route("forget", "t")], label_source=3)  # type: ignore[arg-type]


def test_the_readme_tuple_batch_example_runs_and_its_label_source_computes_the_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "class HighDigits" in block]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["routing"].steps_routed == 4
    assert namespace["routing"].label_totals == [float((namespace["y"] < 5).sum()), float((namespace["y"] >= 5).sum())]
    labels = namespace["HighDigits"]()((torch.randn(3, 8), torch.tensor([1, 7, 5])))
    assert labels.tolist() == [0, 1, 1]


def test_the_label_source_docstring_example_holds() -> None:
    import lightning_gradroute.labels

    result = doctest.testmod(lightning_gradroute.labels)
    assert result.attempted >= 2 and result.failed == 0

"""Two ``GradientRoutingCallback`` s in one ``Trainer``: they route as one merged callback would, each checkpoints
and resumes its own state (a trainer's only routing callback keeps the plain key, so older checkpoints load), and
what two cannot share (a target name, a hooked site or parameter, an expansion or ablation) is refused at setup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import DDP, FEATURES, RoutedDataModule, TinyClassifier, example_data, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_gradroute import Expansion, GradientRoutingCallback, LabelSource, ParameterTarget, Phase, Route, Target
from lightning_gradroute.callback import routing_callback_before

LABELS = [0, 1, 0, 1, 1, 0, 0, 0]


class RetainOnly(LabelSource):
    """Every item is ``retain``: the head callback's label counts differ from the encoder's."""

    def __call__(self, batch: Any) -> Tensor:
        return torch.zeros_like(batch["route_labels"])


def encoder(**kwargs: Any) -> GradientRoutingCallback:
    return GradientRoutingCallback({"enc": Target("encoder")}, [Route("forget", "enc", {"0:8": 0.0})], **kwargs)


def head(**kwargs: Any) -> GradientRoutingCallback:
    routes = [Route("retain", "head", {"0:2": 0.5})]
    return GradientRoutingCallback({"head": Target("head")}, routes, label_source=RetainOnly(), **kwargs)


def data() -> RoutedDataModule:
    return RoutedDataModule(example_data(8, LABELS), batch_size=4)


def test_two_callbacks_route_exactly_as_one_merged_callback(tmp_path: Path) -> None:
    head_routes = [Route("forget", "head", {"0:2": 0.5}), Route("retain", "head", {"0:2": 0.5})]
    merged = GradientRoutingCallback(
        {"enc": Target("encoder"), "head": Target("head")}, [Route("forget", "enc", {"0:8": 0.0}), *head_routes]
    )
    trained = {}
    for name, callbacks in (("two", [encoder(), GradientRoutingCallback({"head": Target("head")}, head_routes)]),
                            ("one", [merged])):  # fmt: skip
        torch.manual_seed(0)
        model = TinyClassifier()
        pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path / name)).fit(model, data())
        trained[name] = model.state_dict()
    for key, value in trained["one"].items():
        torch.testing.assert_close(trained["two"][key], value, rtol=0, atol=0)


@pytest.mark.timeout(90)
def test_each_callback_checkpoints_and_resumes_its_own_state(tmp_path: Path) -> None:
    first = [encoder(), head()]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="epoch1")
    pl.Trainer(callbacks=[*first, checkpoint], **trainer_kwargs(tmp_path, enable_checkpointing=True)).fit(
        TinyClassifier(), data()
    )
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)["callbacks"]
    assert saved[first[0].state_key]["label_totals"] == [5.0, 3.0]
    assert saved[first[1].state_key]["label_totals"] == [8.0, 0.0]
    assert first[0].state_key != first[1].state_key

    resumed = [head(), encoder()]  # in another order: each finds its state by its targets
    pl.Trainer(callbacks=resumed, **trainer_kwargs(tmp_path, max_epochs=2)).fit(
        TinyClassifier(), data(), ckpt_path=tmp_path / "epoch1.ckpt"
    )
    assert [cb.label_totals for cb in resumed] == [[16.0, 0.0], [10.0, 6.0]]
    assert [cb.steps_routed for cb in resumed] == [4, 4]

    alone = encoder()  # saved beside another, resumed alone: it finds its state by its targets' names
    pl.Trainer(callbacks=[alone], **trainer_kwargs(tmp_path, max_epochs=2)).fit(
        TinyClassifier(), data(), ckpt_path=tmp_path / "epoch1.ckpt"
    )
    assert (alone.state_key, alone.steps_routed, alone.label_totals) == ("GradientRoutingCallback", 4, [10.0, 6.0])
    other = GradientRoutingCallback({"act": Target("act")}, [Route("forget", "act", {"0:8": 0.0})])
    with pytest.raises(ValueError, match=r"no state of a routing callback with targets \['act'\], only of ones with "
                       r"targets \[\['enc'\], \['head'\]\]; resume with the same routing callbacks"):  # fmt: skip
        pl.Trainer(callbacks=[other], **trainer_kwargs(tmp_path, max_epochs=2)).fit(
            TinyClassifier(), data(), ckpt_path=tmp_path / "epoch1.ckpt"
        )
    moved = GradientRoutingCallback({"enc": Target("act")}, [Route("forget", "enc", {"0:8": 0.0})])
    with pytest.raises(ValueError, match=r"another routing config: targets\.enc\.modules: 'encoder' -> 'act'; "):
        pl.Trainer(callbacks=[moved, head()], **trainer_kwargs(tmp_path, max_epochs=2)).fit(
            TinyClassifier(), data(), ckpt_path=tmp_path / "epoch1.ckpt"
        )


@pytest.mark.timeout(60)
def test_a_single_callback_keeps_the_plain_state_key_so_older_checkpoints_resume(tmp_path: Path) -> None:
    # The key every checkpoint had before two routing callbacks were allowed; a single callback still writes it.
    single = encoder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="old")
    pl.Trainer(callbacks=[single, checkpoint], **trainer_kwargs(tmp_path, enable_checkpointing=True)).fit(
        TinyClassifier(), data()
    )
    ckpt = torch.load(tmp_path / "old.ckpt", weights_only=False)
    assert list(ckpt["callbacks"])[0] == "GradientRoutingCallback" == single.state_key
    resumed = encoder()
    pl.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path, max_epochs=2)).fit(
        TinyClassifier(), data(), ckpt_path=tmp_path / "old.ckpt"
    )
    assert (resumed.steps_routed, resumed.label_totals) == (4, [10.0, 6.0])
    with pytest.raises(ValueError, match=r"no state of a routing callback with targets \['head'\], only of ones "
                       r"with targets \[\['enc'\]\]"):  # fmt: skip
        pl.Trainer(callbacks=[encoder(), head()], **trainer_kwargs(tmp_path, max_epochs=2)).fit(
            TinyClassifier(), data(), ckpt_path=tmp_path / "old.ckpt"
        )


def dedicated(target: str, param: str) -> GradientRoutingCallback:
    routes = [Route("forget", target, {"0:8": 0.0})]
    return GradientRoutingCallback({target: ParameterTarget(param)}, routes, ablate="dedicated", ablate_label="retain")


MERGE = r"; merge the two GradientRoutingCallbacks into one \(one targets dict, one routes list\)"


def weight(target: str = "enc") -> GradientRoutingCallback:
    return GradientRoutingCallback({target: ParameterTarget("encoder.weight")}, [Route("forget", target, {":4": 0.0})])


@pytest.mark.parametrize(
    ("first", "second", "error"),
    [
        (
            encoder,
            lambda: GradientRoutingCallback({"enc": Target("head")}, [Route("forget", "enc", {"0:2": 0.0})]),
            r"GradientRoutingCallback: two routing callbacks name a target 'enc', which would mix their logged metrics and messages; rename it "
            r"in one of them, or merge",
        ),
        (
            encoder,
            lambda: GradientRoutingCallback({"again": Target("encoder")}, [Route("forget", "again", {"8:": 0.0})]),
            r"GradientRoutingCallback: targets 'enc' and 'again' of two routing callbacks both route 'encoder' \(output\)" + MERGE,
        ),
        (weight, lambda: weight("w"), r"parameter target 'w' \('encoder.weight', dim 0\): the parameter is already "
                                      r"routed by parameter target 'enc' \('encoder.weight', dim 0\) of another router "
                                      r"or routing callback; route each parameter from one target: merge the two "
                                      r"GradientRoutingCallbacks \(or routers\) into one$"),  # fmt: skip
        (
            lambda: dedicated("enc", "encoder.weight"),
            lambda: dedicated("b", "head.bias"),
            r"GradientRoutingCallback: the routing callbacks of targets \['enc'\] and \['b'\] both expand or ablate the model, which only one "
            r"may" + MERGE,
        ),
    ],
    ids=["target-name", "site", "parameter", "two-ablations"],
)
def test_what_two_callbacks_cannot_share_is_refused_at_setup(tmp_path: Path, first: Any, second: Any, error: str) -> None:
    trainer = pl.Trainer(callbacks=[first(), second()], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="^" + error):
        trainer.fit(TinyClassifier(), data())


class BlockThenOut(TinyClassifier):
    """``block`` (Linear, ReLU, Linear) for an expansion, then ``out``, which no expansion touches."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 4))
        self.out = nn.Linear(4, 4)

    def compute_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self.out(self.block(batch["x"])), batch["y"])


def test_only_the_expanding_callback_ablates_and_saves_listed_after_a_plain_one(tmp_path: Path) -> None:
    plain = GradientRoutingCallback({"out": Target("out")}, [Route("forget", "out", {"0:2": 0.0})])
    era = GradientRoutingCallback(
        {"block": Target("block.0")},
        [Route("forget", "block", {"original": 0.0})],
        expansions=[Expansion("block", preset="linear_pair", add=4, up=("0",), down=("2",))],
        save_ablated=str(tmp_path),
    )
    model = BlockThenOut()
    pl.Trainer(callbacks=[plain, era], **trainer_kwargs(tmp_path)).fit(model, data())
    assert era.phase is Phase.CONTRACTED and model.block[0].weight.shape == (16, FEATURES)
    assert (tmp_path / "ablated" / "model.safetensors").is_file()


def test_routing_callback_before_picks_the_one_that_ablates(tmp_path: Path) -> None:
    plain, ablating, after = encoder(), dedicated("w", "head.weight"), pl.Callback()
    trainer = pl.Trainer(callbacks=[plain, ablating, after], **trainer_kwargs(tmp_path))
    assert routing_callback_before(trainer, after, "Evaluation") is ablating
    trainer = pl.Trainer(callbacks=[plain, head(), after], **trainer_kwargs(tmp_path))
    assert routing_callback_before(trainer, after, "Evaluation") is plain
    with pytest.raises(ValueError, match="Evaluation: list it after the GradientRoutingCallback, whose ablation"):
        routing_callback_before(pl.Trainer(callbacks=[plain, after, head()], **trainer_kwargs(tmp_path)), after, "Evaluation")


class SaveStates(pl.Callback):
    """Each rank writes its parameters and both routing callbacks' label counts to ``<dir>/rank<r>.pt``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        routing = [cb for cb in trainer.callbacks if isinstance(cb, GradientRoutingCallback)]
        state = {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "label_totals": [cb.label_totals for cb in routing],
        }
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.timeout(180)
def test_two_callbacks_under_ddp_spawn_checkpoint_their_own_state(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="ddp")
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True, **DDP)
    columns = example_data(8, LABELS)
    pl.Trainer(callbacks=[encoder(), head(), SaveStates(tmp_path), checkpoint], **kwargs).fit(
        TinyClassifier(), RoutedDataModule(columns, batch_size=2, shard_global_batches=True)
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, param in ranks[0]["params"].items():
        assert torch.equal(param, ranks[1]["params"][name]), f"{name} differs across ranks"
    # Rank 0 gets rows 0, 1, 4, 5 (labels 0 1 1 0), rank 1 rows 2, 3, 6, 7 (0 1 0 0).
    assert [r["label_totals"] for r in ranks] == [[[2.0, 2.0], [4.0, 0.0]], [[3.0, 1.0], [4.0, 0.0]]]
    saved = torch.load(tmp_path / "ddp.ckpt", weights_only=False)["callbacks"]
    resumed = [encoder(), head()]
    assert [saved[cb.state_key]["label_totals"] for cb in resumed] == [[2.0, 2.0], [4.0, 0.0]]  # rank 0 saves
    pl.Trainer(callbacks=resumed, **trainer_kwargs(tmp_path, max_epochs=2)).fit(
        TinyClassifier(), data(), ckpt_path=tmp_path / "ddp.ckpt"
    )
    assert [cb.label_totals for cb in resumed] == [[7.0, 5.0], [12.0, 0.0]]

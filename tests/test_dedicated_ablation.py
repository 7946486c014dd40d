"""``ablate="dedicated"``: SGTM's ablation for parameter routing without an expansion. The units only one label may
change (weight nonzero for it, zero for every other label) are zeroed at fit end, on every rank, and recorded;
``GradientRouter.dedicated_units`` says which, ``era.zero_units`` zeroes them (also on FSDP2 ``DTensor`` shards);
the ablation modes have one parse with a one-line error."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from era_models import NeoLM
from helpers import DDP, MixinTokenModel, RoutedDataModule, TokenModel, token_columns, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from torch import nn

from lightning_gradroute import Expansion, GradientRouter, GradientRoutingCallback, ParameterTarget, Route, Target
from lightning_gradroute.era import Ablation, zero_units

LABELS = ["retain", "forget", "other"]


def three_label_routes() -> tuple[dict[str, ParameterTarget], list[Route]]:
    """``encoder.weight`` (16, 8) by rows, ``head.weight`` (11, 16) by columns, ``embed.weight`` (11, 8) by
    columns; the overlaps are such that only some of the units forget may change are barred to both others."""
    targets = {
        "enc": ParameterTarget("encoder.weight", dim=0),
        "head": ParameterTarget("head.weight", dim=1),
        "embed": ParameterTarget("embed.weight", dim=1),
    }
    routes = [
        Route("forget", "enc", {":8": 0.0, "14:": 0.5}),  # forget may change rows 8:16
        Route("retain", "enc", {"8:12": 0.0, "12:": 0.5}),  # retain barred from 8:12 only
        Route("other", "enc", {"10:": 0.0}),  # other barred from 10:16
        Route("forget", "head", {"4:": 0.0}),  # forget may change columns 0:4 of the head
        Route("retain", "head", {":4": 0.0}),
        Route("other", "head", {":2": 0.0}),  # other barred from 0:2 only
        Route("forget", "embed", 0.0),  # forget changes nothing of the embedding: nothing dedicated there
    ]
    return targets, routes


def hand_dedicated() -> dict[str, tuple[int, list[int]]]:
    """From the routes above, by hand: where forget's weight is nonzero and retain's and other's are zero."""
    enc = set(range(8, 16)) & set(range(8, 12)) & set(range(10, 16))
    head = set(range(4)) & set(range(4)) & set(range(2))
    return {"encoder.weight": (0, sorted(enc)), "head.weight": (1, sorted(head))}


def test_dedicated_units_equal_a_hand_computation_from_the_routes() -> None:
    targets, routes = three_label_routes()
    router = GradientRouter(targets, routes, LABELS)
    with router.attached(TokenModel()):
        assert router.dedicated_units("forget") == hand_dedicated() == {
            "encoder.weight": (0, [10, 11]), "head.weight": (1, [0, 1])
        }  # fmt: skip
        # against retain alone (SGTM's forget units when "other" is a default mode that changes everything)
        assert router.dedicated_units("forget", against=["retain"]) == {
            "encoder.weight": (0, [8, 9, 10, 11]), "head.weight": (1, [0, 1, 2, 3])
        }  # fmt: skip
        with pytest.raises(ValueError, match=r"no routed parameter has a unit that only 'retain' may change \(against "
                                             r"\['forget', 'other'\]\); route those labels away"):  # fmt: skip
            router.dedicated_units("retain")  # every unit retain may change, forget or other may change too
        for label, against in (("forgt", None), ("forget", ["forget"]), ("forget", ["retian"]), ("forget", [])):
            with pytest.raises(ValueError, match=r"dedicated_units: label .* must name known, other labels; labels "
                                                 r"are \['retain'"):  # fmt: skip
                router.dedicated_units(label, against=against)
    with pytest.raises(ValueError, match="the router routes no parameter; attach it"):
        router.dedicated_units("forget")


class Snapshot(Callback):
    """The parameters right after training (before the routing callback's fit-end ablation) and after it, per
    rank, to ``<dir>/rank<r>.pt`` when given a directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trained = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ablated = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        routing = next(c for c in trainer.callbacks if isinstance(c, GradientRoutingCallback))
        if self.directory is not None:
            state = {"trained": self.trained, "ablated": self.ablated, "units": routing.ablated_units}
            torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def sgtm_routing(**kwargs: Any) -> GradientRoutingCallback:
    """SGTM-style: forget tokens may change only encoder units 12:16 (rows of its weight and bias, columns of the
    head), retain tokens only the others; an activation target beside them."""
    targets = {
        "up": ParameterTarget("encoder.weight", dim=0),
        "up_bias": ParameterTarget("encoder.bias"),
        "down": ParameterTarget("head.weight", dim=1),
        "act": Target("act"),
    }
    routes = [Route(label, t, {units: 0.0}) for t in ("up", "up_bias", "down")
              for label, units in (("forget", ":12"), ("retain", "12:"))]  # fmt: skip
    routes.append(Route("forget", "act", {":12": 0.0}))
    return GradientRoutingCallback(targets, routes, **{"ablate": "dedicated", "ablate_label": "forget", **kwargs})


def check_exactly_dedicated_zeroed(trained: dict[str, torch.Tensor], ablated: dict[str, torch.Tensor]) -> None:
    """Encoder rows 12:16, its bias 12:16 and head columns 12:16 are zero; everything else is as trained."""
    zeroed = {"encoder.weight": (0, 12), "encoder.bias": (0, 12), "head.weight": (1, 12)}
    for name, before in trained.items():
        after = ablated[name]
        if name in zeroed:
            dim, start = zeroed[name]
            assert not after.narrow(dim, start, 4).any(), name
            assert before.narrow(dim, start, 4).abs().sum() > 0, f"{name}: the dedicated units were zero already"
            assert torch.equal(after.narrow(dim, 0, start), before.narrow(dim, 0, start)), name
        else:
            assert torch.equal(after, before), name


def test_fit_zeroes_exactly_the_dedicated_units_records_and_saves_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    routing, snapshot = sgtm_routing(), Snapshot()
    model = MixinTokenModel()
    trainer = pl.Trainer(callbacks=[routing, snapshot], **trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(model, RoutedDataModule(token_columns(), batch_size=4))
    check_exactly_dedicated_zeroed(snapshot.trained, snapshot.ablated)
    assert routing.ablated_units == {"encoder.weight": 4, "encoder.bias": 4, "head.weight": 4}
    assert routing.ablate is Ablation.DEDICATED and routing.phase is None
    saved = load_file(tmp_path / "ablated" / "model.safetensors")
    assert sorted(saved) == sorted(snapshot.ablated)
    assert all(torch.equal(saved[n], v) for n, v in snapshot.ablated.items())


@pytest.mark.timeout(150)
def test_ddp_spawn_zeroes_the_dedicated_units_on_every_rank(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MixinTokenModel(normalization="global")
    trainer = pl.Trainer(callbacks=[sgtm_routing(save_ablated=False), Snapshot(tmp_path)],
                         **trainer_kwargs(tmp_path, max_steps=2, **DDP))  # fmt: skip
    trainer.fit(model, RoutedDataModule(token_columns(), batch_size=2, shard_global_batches=True))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        check_exactly_dedicated_zeroed(rank["trained"], rank["ablated"])
        assert rank["units"] == {"encoder.weight": 4, "encoder.bias": 4, "head.weight": 4}
    for name, value in ranks[0]["ablated"].items():
        assert torch.equal(ranks[1]["ablated"][name], value), name
        assert torch.equal(model.get_parameter(name).detach(), value), name  # handed back to the main process


def test_dedicated_is_refused_where_it_cannot_do_what_it_says(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ablate mode must be one of \['contract', 'zero', 'dedicated'\], got "
                                         r"'dedicate'"):  # fmt: skip
        sgtm_routing(ablate="dedicate")
    with pytest.raises(ValueError, match=r"needs ablate_label, the label whose dedicated units are zeroed, one of "
                                         r"\['retain', 'forget'\]; got 'forgt'"):  # fmt: skip
        sgtm_routing(ablate_label="forgt")
    with pytest.raises(ValueError, match="no ParameterTarget; add parameter targets"):
        GradientRoutingCallback({"a": Target("act")}, [Route("forget", "a", 0.0)], ablate="dedicated",
                                ablate_label="forget")  # fmt: skip
    with pytest.raises(ValueError, match=r"ablate_label='forget' is only used by ablate='dedicated', got 'zero'"):
        GradientRoutingCallback({"a": Target("act")}, [Route("forget", "a", 0.0)], ablate="zero",
                                ablate_label="forget")  # fmt: skip
    mlp = {"modules": "model.transformer.h.*.mlp", "preset": "gpt_neo_mlp", "add": 2}
    with pytest.raises(ValueError, match="ablate='dedicated' is for parameter routing without an expansion"):
        sgtm_routing(expansions=[Expansion.from_dict(mlp)])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    neo = GradientRoutingCallback({"w": ParameterTarget("model.transformer.h.*.mlp.c_fc.weight")},
                                  [Route("forget", "w", {":8": 0.0}), Route("retain", "w", {"8:": 0.0})],
                                  ablate="dedicated", ablate_label="forget")  # fmt: skip
    with pytest.raises(ValueError, match="ablate='dedicated' is for parameter routing without an expansion"):
        neo.setup(trainer, NeoLM(expansions=[mlp]), "fit")  # the mixin expands itself in configure_model
    shared = GradientRoutingCallback({"w": ParameterTarget("encoder.weight")}, [Route("forget", "w", {":8": 0.0})],
                                     ablate="dedicated", ablate_label="forget")  # fmt: skip
    with pytest.raises(ValueError, match="no routed parameter has a unit that only 'forget' may change"):
        shared.setup(trainer, MixinTokenModel(), "fit")


def test_ablation_modes_parse_once_with_a_one_line_error() -> None:
    assert Ablation.parse("dedicated", "x") is Ablation.DEDICATED
    assert Ablation.parse(Ablation.ZERO, "x", expansion=True) is Ablation.ZERO
    assert [m.phase and m.phase.value for m in Ablation] == ["contracted", "zeroed", None]
    for bad in ("dedicated", None, 0):
        with pytest.raises(ValueError, match=r"^ablate_state_dict: ablate mode must be one of \['contract', 'zero'\]"):
            Ablation.parse(bad, "ablate_state_dict", expansion=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero_sharded(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)  # the same full tensors on both ranks
        model = nn.Module()
        model.up = nn.Parameter(distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)]))  # rows 0:3 | 3:5
        model.down = nn.Parameter(distribute_tensor(torch.randn(5, 4), mesh, [Shard(0)]))  # sharded off dim 1
        counts = zero_units(model, {"up": (0, [1, 3, 4]), "down": (1, [0, 2])})
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"counts": counts, **full}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(90)
def test_zero_units_on_fsdp2_dtensor_shards_zeroes_the_global_indices(tmp_path: Path) -> None:
    out = tmp_path / "full.pt"
    mp.spawn(_zero_sharded, args=(_free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    torch.manual_seed(0)
    up, down = torch.randn(5, 3), torch.randn(5, 4)
    up[[1, 3, 4]] = 0.0
    down[:, [0, 2]] = 0.0
    assert got["counts"] == {"up": 3, "down": 2}
    assert torch.equal(got["up"], up) and torch.equal(got["down"], down)


def test_ablate_against_names_the_labels_a_dedicated_unit_is_barred_to(tmp_path: Path) -> None:
    """SGTM with a default mode ("other" here may change what retain may not): the forget units are those retain
    may not change, whatever the default mode may."""
    targets, routes = three_label_routes()
    routing = GradientRoutingCallback(targets, routes, LABELS, ablate="dedicated", ablate_label="forget",
                                      ablate_against=["retain"], save_ablated=False)  # fmt: skip
    trainer, model = pl.Trainer(**trainer_kwargs(tmp_path)), TokenModel()
    routing.setup(trainer, model, "fit")
    assert routing.era.dedicated == {"encoder.weight": (0, [8, 9, 10, 11]), "head.weight": (1, [0, 1, 2, 3])}
    routing.teardown(trainer, model, "fit")
    for kwargs, message in (
        (dict(ablate_against=["forget"]), r"ablate_against must name labels other than ablate_label='forget', among"),
        (dict(ablate_against=["retian"]), r"ablate_against must name labels other than"),
        (dict(ablate_against=[]), r"ablate_against must name labels other than"),
        (dict(ablate="zero", ablate_label=None, ablate_against=["retain"]), r"ablate_against is only used by "
                                                                             r"ablate='dedicated', got 'zero'"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            GradientRoutingCallback(targets, routes, LABELS, **{"ablate": "dedicated", "ablate_label": "forget",
                                                                **kwargs})  # fmt: skip

"""The ``gradroute`` console script: LightningCLI with any LightningModule / LightningDataModule by class path.

    gradroute fit --config recipes/toy/split.yaml
    gradroute fit --config recipes/toy/split.yaml --trainer.devices 8 --trainer.strategy ddp
    gradroute ablate --checkpoint last.ckpt --output ablated.ckpt     # see lightning_gradroute.ablate_cli

Every ``fit`` saves its final model under ``<log_dir>/final/`` (:class:`~lightning_gradroute.export.SaveFinalModel`,
configured as ``final_model``, appended after the config's callbacks; ``--final_model.enabled false`` turns it off).

A config that does not parse or whose classes refuse their arguments stops with one line, the key path and the
culprit (``gradroute: trainer.callbacks[0].init_args.targets.mlp.modlues: Target does not accept 'modlues'; did you
mean 'modules'?``), and a hint; ``JSONARGPARSE_DEBUG=true`` shows jsonargparse's full report instead.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import pydoc
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_gradroute import ablate_cli
from lightning_gradroute.export import SaveFinalModel

__all__ = ["ConfigError", "GradrouteCLI", "main"]


class ConfigError(ValueError):
    """A config that does not parse, or whose classes refuse their arguments: ``"<key path>: <what>"``."""


class GradrouteCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data; saves the resolved config and the final model.

    Raises:
        ConfigError: one line, the YAML key path and the culprit, for a config that does not parse (unknown key,
            wrong type, unknown class, missing file) or whose classes raise in their constructors.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: object) -> None:
        # Denormal floats slow CPU training by an order of magnitude once activations get tiny (L1 penalties);
        # flushing them changes no result that matters and keeps epoch times flat.
        torch.set_flush_denormal(True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs["parser_kwargs"] = {"exit_on_error": False, **kwargs.get("parser_kwargs", {})}  # type: ignore[dict-item]
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,  # type: ignore[arg-type]
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``final_model``: :class:`SaveFinalModel`, after the config's callbacks (it saves what they leave)."""
        parser.add_lightning_class_args(SaveFinalModel, "final_model")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(_parse_error(err, sys.argv[1:] if args is None else args)) from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            config = self.config[self.subcommand] if self.subcommand else self.config
            raise ConfigError(_instantiation_error(err, config.as_dict())) from err


def main(args: list[str] | None = None) -> None:
    """``gradroute ablate ...`` ablates a saved checkpoint; every other subcommand is LightningCLI's."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["ablate"]:
        ablate_cli.main(argv[1:])
        return
    try:
        GradrouteCLI(args=args)
    except ValueError as err:  # a ConfigError, or one of the library's one-line errors (a pattern matching nothing)
        ours = traceback.extract_tb(err.__traceback__)[-1].filename.startswith(os.path.dirname(__file__))
        if os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true" or not (ours or isinstance(err, ConfigError)):
            raise
        command = " ".join(["gradroute", *argv[:1]]) if argv[:1] and not argv[0].startswith("-") else "gradroute"
        sys.stderr.write(f"{command}: {err}\nhint: '{command} --help' lists the options; JSONARGPARSE_DEBUG=true shows "
                         "the full report\n")  # fmt: skip
        raise SystemExit(2) from None


def _chain(err: BaseException | None) -> list[BaseException]:
    """``err`` and its causes, outermost first (jsonargparse nests one report per key and class)."""
    out = []
    while err is not None and err not in out:
        out, err = [*out, err], err.__cause__ or err.__context__
    return out


def _parse_error(err: ArgumentError, args: Any) -> str:
    """``"<key path>: <culprit>"`` from jsonargparse's nested report, the path found in the ``--config`` files."""
    chain = _chain(err)
    report = "\n".join(map(str, chain))
    keys = [s for k in dict.fromkeys(re.findall(r'^Parser key "([^"]+)"', report, re.M)) for s in k.split(".")]
    classes = re.findall(r"^Problem with given class_path '([^']+)'", report, re.M)
    culprit = (str(chain[-1]).strip() or str(chain[0])).splitlines()[0]
    missing = re.search(r"Expected a path but (.+) either not accessible or invalid", str(chain[0]))
    unknown = re.fullmatch(r"Option '([^']+)' is not accepted", culprit)
    union = next((str(e) for e in reversed(chain) if "Subtypes: [" in str(e) and "Given value: " in str(e)), "")
    if missing:
        culprit = f"file {missing.group(1)!r} does not exist (nor is it a class path)"
    elif unknown and classes and callable(cls := pydoc.locate(classes[-1])):
        keys.append(name := unknown.group(1))
        accepted = list(inspect.signature(cls).parameters)
        close = difflib.get_close_matches(name, accepted, n=1)
        culprit = f"{cls.__name__} does not accept {name!r}; " + (
            f"did you mean {close[0]!r}?" if close else f"it accepts {accepted}"
        )
    elif culprit.startswith("Expected a") and union:  # of one member of a union: say what the union takes
        given, types = re.search(r"Given value: (.*)", union), re.search(r"Subtypes: \[(.*)\]", union)
        types = re.sub(r"<class '([^']+)'>", r"\1", types.group(1))  # type: ignore[union-attr]
        culprit = f"got {given.group(1)}, expected one of {types}"  # type: ignore[union-attr]
    found = (_find(c, lambda _, rest: not rest, keys) for c in reversed(_config_files(args)))
    return f"{_format(next((p for p in found if p), keys)) or 'config'}: {culprit}"


def _instantiation_error(err: BaseException, config: dict[str, Any]) -> str:
    """``"<key path>: <error>"`` for the innermost error raised outside jsonargparse, located in ``config`` by the
    arguments of the constructor it was raised in (the first ``__init__`` frame of its traceback)."""
    outside = [e for e in _chain(err) if "jsonargparse" not in traceback.extract_tb(e.__traceback__)[-1].filename]
    root = outside[-1] if outside else err
    message = (str(root).strip() or type(root).__name__).splitlines()[0]
    message = message if isinstance(root, ValueError) else f"{type(root).__name__}: {message}"
    frames = [f for f, _ in traceback.walk_tb(root.__traceback__) if f.f_code.co_name == "__init__"]
    init = next((f for f in frames if "self" in f.f_locals), None)
    if init is None:
        return message
    names = init.f_code.co_varnames[1 : init.f_code.co_argcount + init.f_code.co_kwonlyargcount]
    arguments = {k: init.f_locals.get(k) for k in names}

    def holds(node: Any, _: Any) -> bool:  # the constructor's arguments, compared where plain
        scalars = (str, int, float, bool)
        fits = isinstance(node, dict) and bool(node) and node.keys() <= arguments.keys()
        return fits and all(arguments[k] == v for k, v in node.items() if isinstance(v, scalars))

    path = _find(config, holds, [])
    return f"{_format(path)}: {message}" if path else message


def _find(node: Any, done: Any, keys: list[str], path: tuple = ()) -> tuple | None:
    """The first path (depth first) through dicts and lists that passes ``keys`` in order to where ``done(node, keys
    left)`` holds."""
    if done(node, keys):
        return path if path or not keys else None
    if isinstance(node, dict) and keys and keys[0] in node:
        found = _find(node[keys[0]], done, keys[1:], (*path, keys[0]))
        if found:
            return found
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    found = (_find(v, done, keys, (*path, k)) for k, v in children if isinstance(v, (dict, list)))
    return next((f for f in found if f), None)


def _format(path: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _config_files(args: Any) -> list[Any]:
    """The YAML of every ``--config`` / ``-c`` file in ``args`` that loads."""
    names = [str(b) for a, b in zip(args, args[1:]) if a in ("-c", "--config")] if isinstance(args, list) else []
    loaded = []
    for name in names:
        with contextlib.suppress(OSError, yaml.YAMLError), open(name) as file:
            loaded.append(yaml.safe_load(file))
    return loaded


if __name__ == "__main__":
    main()

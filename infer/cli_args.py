"""Command-line options built from `infer.api.DecodeConfig`'s fields, so every command takes the same ones.

    parser = argparse.ArgumentParser()
    add_decode_args(parser)                 # --mode, --max-new-tokens, --block-size, --tau-add, ...
    cfg = decode_config_from_args(parser.parse_args())

Why generated and not written out: a field added to `DecodeConfig` becomes an option of every
command at once, and values go through `d2f.yaml_config.from_dict`, which converts strings to the
field's declared type and lets `DecodeConfig` validate them (one set of error messages). `add_compile_arg`
is the one option about loading the model that every command spells the same way.
"""
from __future__ import annotations

import argparse
import dataclasses

from d2f.yaml_config import from_dict


def _decode_config_cls():
    from infer.decode_config import DecodeConfig
    return DecodeConfig


def decode_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(_decode_config_cls()) if f.init]


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    """`--compile`, the same in every command that loads a model (`infer.api.load(..., compile=True)`)."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the forward (infer.graphs.compiled; same tokens, fused elementwise work; "
                             "each new shape compiles first, about a minute on a laptop CPU)")


def add_decode_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> argparse._ArgumentGroup:
    """One `--field-name` option per DecodeConfig field. Unset options keep DecodeConfig's defaults
    (the option's value stays None, so we can tell "not given" from "given the default")."""
    group = parser.add_argument_group("decoding (infer.api.DecodeConfig)")
    for f in decode_fields():
        if f.name in skip:
            continue
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"decode_{f.name}", default=None, metavar="V",
                           help=f"DecodeConfig.{f.name} (default: {_default(f)})")
    return group


def decode_overrides(args: argparse.Namespace) -> dict:
    """The DecodeConfig fields given on the command line, as strings."""
    out = {}
    for f in decode_fields():
        value = getattr(args, f"decode_{f.name}", None)
        if value is not None:
            out[f.name] = value
    return out


def decode_config_from_args(args: argparse.Namespace, base: dict | None = None):
    """DecodeConfig from `base` (e.g. {"mode": "d2f"}) <- command-line options; typed and validated."""
    from infer.decode_config import check_fields_apply
    data = dict(base or {})
    given = decode_overrides(args)
    data.update(given)
    cfg = from_dict(_decode_config_cls(), data, where="decoding options")
    check_fields_apply(cfg.mode, given)
    return cfg

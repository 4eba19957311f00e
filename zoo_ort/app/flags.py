"""Command-line options generated from the tables that own them: the training settings
(:data:`zoo_ort.settings.FIELDS`) and the execution-provider table's typed options.

A setting or a provider option is declared once; the CLI gets its flag, type and help from
there. :func:`with_options` appends the generated options to a typer command's own signature.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer

from zoo_ort.settings import DEFAULTS, FIELDS

PANELS = {
    "data": "Data",
    "train": "Training",
    "eval": "Evaluation",
    "run": "Run folder",
    "engine": "Engine",
}
PROVIDER_PANEL = "Execution provider"


def _cli_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return base | None


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


def setting_params(names: Iterable[str], note: str = "") -> list[inspect.Parameter]:
    """One ``--name`` option (default None: "not given") per setting, in the setting's panel."""
    hints = typing.get_type_hints(type(DEFAULTS))
    params = []
    for name in names:
        f = FIELDS[name]
        default = getattr(DEFAULTS, name)
        help_text = f"{f.metadata['help']} (default {_show(default)}{note})"
        if default is None:
            help_text = f.metadata["help"]
        option = typer.Option(
            f"--{name.replace('_', '-')}",
            help=help_text,
            show_default=False,
            rich_help_panel=PANELS[f.metadata["section"]],
        )
        annotation = Annotated[_cli_type(hints[name]), option]
        params.append(_keyword(name, annotation))
    return params


def training_flag_names() -> list[str]:
    return [name for name, f in FIELDS.items() if f.metadata["flag"]]


def provider_params() -> list[inspect.Parameter]:
    """The typed per-device flags (``--cuda-device-id``, ``--qnn-backend``, ...) of the table."""
    from zoo_ort.providers.table import PROVIDERS

    params = []
    for spec in PROVIDERS.values():
        for opt in spec.options:
            if not opt.cli_flag:
                continue
            kind = {"bool": bool, "int": int}.get(opt.kind, str)
            choices = f" ({', '.join(opt.choices)})" if opt.choices else ""
            option = typer.Option(
                opt.cli_flag,
                help=f"{spec.name.upper()}: {opt.help}{choices}",
                show_default=False,
                rich_help_panel=PROVIDER_PANEL,
            )
            params.append(_keyword(provider_flag_key(opt.cli_flag), Annotated[kind | None, option]))
    return params


def provider_flag_key(cli_flag: str) -> str:
    return cli_flag.lstrip("-").replace("-", "_")


def provider_flag_keys() -> list[str]:
    return [p.name for p in provider_params()]


def _keyword(name: str, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def with_options(extra: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Give a command taking ``**options`` the generated ``extra`` parameters (typer reads the
    signature and the annotations; the command receives them in ``options``)."""

    def wrap(func: Callable) -> Callable:
        own = [
            p
            for p in inspect.signature(func, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            return func(**kwargs)

        params = own + extra
        del command.__wrapped__  # typer must see the generated signature, not func's
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap

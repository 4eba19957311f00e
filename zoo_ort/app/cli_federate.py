"""``zoo-ort federate``: federated fine-tuning in Flower's simulation engine."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Annotated, Any

from zoo_ort.app import flags
from zoo_ort.app.cli import (
    RECIPE_NOTE,
    BundleArg,
    ConfigOpt,
    FallbackOpt,
    Opt,
    ProviderOpt,
    ProviderOptionOpt,
    _Command,
    _print_summary,
    _resolve,
    app,
    err,
    third_party_quiet,
)

FL = "Federation"


@app.command(cls=_Command)
@flags.with_options(
    flags.setting_params(flags.training_flag_names(), RECIPE_NOTE) + flags.provider_params()
)
def federate(
    bundle: BundleArg,
    out_dir: Annotated[Path, Opt("--out", help="Server's run folder", rich_help_panel=FL)],
    clients: Annotated[int, Opt(help="Clients K (shards of the train split)", rich_help_panel=FL)],
    rounds: Annotated[int, Opt(help="Rounds R", rich_help_panel=FL)],
    per_round: Annotated[
        int | None, Opt(help="Clients sampled per round M [K]", rich_help_panel=FL)
    ] = None,
    local_steps: Annotated[int, Opt(help="Local ZO steps s per round", rich_help_panel=FL)] = 1,
    alpha: Annotated[
        float, Opt(help="Dirichlet α of the label split (large: IID)", rich_help_panel=FL)
    ] = 0.5,
    g_limit: Annotated[
        float | None, Opt(help="Reject |g| above this [100/eps]", rich_help_panel=FL)
    ] = None,
    outlier_factor: Annotated[
        float, Opt(help="Reject a client whose g RMS exceeds this x the median", rich_help_panel=FL)
    ] = 10.0,
    eval_every_rounds: Annotated[int, Opt(help="Evaluate every K rounds", rich_help_panel=FL)] = 1,
    round_timeout: Annotated[
        float | None, Opt(help="Seconds before a silent client is dropped", rich_help_panel=FL)
    ] = None,
    seeds: Annotated[
        str,
        Opt(help="distinct: each client its own directions; shared: one set", rich_help_panel=FL),
    ] = "distinct",
    num_cpus: Annotated[int | None, Opt(help="CPUs for the simulation", rich_help_panel=FL)] = None,
    config: ConfigOpt = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the server's last round")] = False,
    provider: ProviderOpt = "cpu",
    fallback: FallbackOpt = None,
    provider_option: ProviderOptionOpt = None,
    **options: Any,
) -> None:
    """Federated fine-tuning in Flower's simulation: clients send seeds and scalars only."""
    from zoo_ort.scale.federated import federate as run_federation

    options |= {"out": str(out_dir), "provider": provider, "fallback": fallback}
    options["provider_option"] = provider_option
    resolved = _resolve(bundle, options, config, for_training=True)
    if not os.environ.get("ZOO_ORT_DEBUG"):
        with contextlib.suppress(ImportError):
            import flwr.common.logger  # noqa: F401  (Flower configures its logger on import)
        logging.getLogger("flwr").setLevel(logging.ERROR)  # its deprecation notices, not ours
    with third_party_quiet(), err.status("federating"):
        summary = run_federation(
            resolved.settings,
            clients=clients,
            per_round=per_round or clients,
            rounds=rounds,
            local_steps=local_steps,
            alpha=alpha,
            g_limit=g_limit,
            outlier_factor=outlier_factor,
            eval_every=eval_every_rounds,
            round_timeout=round_timeout,
            seeds=seeds,
            resume=resume,
            num_cpus=num_cpus,
        )
    _print_summary(summary)

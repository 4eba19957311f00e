"""Zeroth-order optimisation in numpy: directions from seeds, the row layout, estimators, losses,
optimisers, and the pure step ``state, record = zo_step(engine, state, batch, settings)``."""

from zoo_ort.zo.directions import direction_rng, directions, grad_from_scalars, rademacher
from zoo_ort.zo.estimators import QueryResult, evaluate_queries, projected_grads
from zoo_ort.zo.losses import candidate_cross_entropy, row_losses
from zoo_ort.zo.rows import pair_losses, perturbed_lora, row_slices
from zoo_ort.zo.step import (
    TrainState,
    apply_scalars,
    init_state,
    optimizer,
    query_step,
    zo_step,
)

__all__ = [
    "QueryResult",
    "TrainState",
    "candidate_cross_entropy",
    "direction_rng",
    "directions",
    "evaluate_queries",
    "grad_from_scalars",
    "init_state",
    "optimizer",
    "pair_losses",
    "perturbed_lora",
    "projected_grads",
    "rademacher",
    "row_losses",
    "row_slices",
    "zo_step",
    "query_step",
    "apply_scalars",
]

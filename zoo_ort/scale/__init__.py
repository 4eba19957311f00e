"""Spreading training over workers: Ray Core actors (:mod:`zoo_ort.scale.ray_workers`).

A ZO step is queries -> a few scalars -> an update replayed from seeds, so workers exchange
seeds and scalars, never tensors. Nothing here is imported by the runtime unless asked for.
"""

"""Task data: datasets, prompt templates, verbalizers and tokenisation.

Typical use::

    spec = build_task("sst2")                       # or build_task(template=..., verbalizer=...)
    encoder = TextEncoder.from_bundle(bundle)
    train = load_task_data("sentiment", "train", spec, encoder, max_length=256)
    batches = make_batch_fn(train, batch_size=16, seed=0)
    batches(step)                                   # -> LabeledBatch, a pure function of the step
"""

from zoo_ort.tasks.dataset import DEFAULT_MAX_LENGTH, TaskData, load_task_data, truncate_prompt
from zoo_ort.tasks.encode import TextEncoder
from zoo_ort.tasks.files import Record, read_records, resolve_data, shipped_sets, split_file
from zoo_ort.tasks.sampler import (
    balanced_batch_indices,
    balanced_order,
    batch_indices,
    epoch_permutation,
    make_batch_fn,
)
from zoo_ort.tasks.spec import (
    BUILTIN,
    CLASSIFICATION,
    LM,
    TaskSpec,
    build_task,
    infer_task_name,
    known_tasks,
    parse_verbalizer,
)

__all__ = [
    "BUILTIN",
    "CLASSIFICATION",
    "DEFAULT_MAX_LENGTH",
    "LM",
    "Record",
    "TaskData",
    "TaskSpec",
    "TextEncoder",
    "balanced_batch_indices",
    "balanced_order",
    "batch_indices",
    "build_task",
    "epoch_permutation",
    "infer_task_name",
    "known_tasks",
    "load_task_data",
    "make_batch_fn",
    "parse_verbalizer",
    "read_records",
    "resolve_data",
    "shipped_sets",
    "split_file",
    "truncate_prompt",
]

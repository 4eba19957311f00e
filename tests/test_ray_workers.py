"""Training over Ray workers (issue 16) on the tiny bundle and a small local Ray cluster.

The claim under test: the adapter, the checkpoints and the metrics of a run spread over workers
are the single-process run's bit for bit, for both ways of sharing a step, through a worker's
death and a resume; a NaN from a worker is a skipped step; diverging workers stop the run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from zoo_ort.app.wiring import prepare, resolve, train_run  # noqa: E402
from zoo_ort.errors import ZooError  # noqa: E402
from zoo_ort.io import load_tensors  # noqa: E402
from zoo_ort.loop.metrics import read_metrics  # noqa: E402
from zoo_ort.scale.ray_workers import train_with_workers  # noqa: E402
from zoo_ort.scale.shares import score_rows, share_rows  # noqa: E402
from zoo_ort.zo import hizoo  # noqa: E402
from zoo_ort.zo.losses import row_losses  # noqa: E402
from zoo_ort.zo.rows import groups, perturbed_lora, perturbed_lora_at  # noqa: E402
from zoo_ort.zo.step import init_state  # noqa: E402

TIMING = {"rows_per_s", "step_time", "steps_per_s", "eval_s"}
FLAGS = dict(data="sentiment", steps=4, queries=3, batch_size=6, eval_every=2, eval_rows=16)
FLAGS |= dict(save_every=2, lr=0.05, optimizer="adam", seed=1)


def _settings(bundle: Path, out: Path | None = None, **kw):
    return resolve(bundle, FLAGS | kw | {"out": str(out or bundle.parent / "unused")}).settings


def _log(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


def _assert_same_run(ref: Path, other: Path) -> None:
    for sub in ("final", "best"):
        a = load_tensors(ref / sub / "adapter_model.safetensors")
        b = load_tensors(other / sub / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])  # bit-identical
    assert _log(ref) == _log(other)
    # The final checkpoint (parameters, optimiser state, best adapter) is the same, tensor for
    # tensor; a resumed run may keep other intermediate ones (where it was stopped).
    last = f"step-{FLAGS['steps']:08d}.safetensors"
    a, b = (load_tensors(run / "checkpoints" / last) for run in (ref, other))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """Single-process runs, by estimator."""
    runs: dict[str, Path] = {}

    def get(estimator: str) -> Path:
        if estimator not in runs:
            out = tmp_path_factory.mktemp("ref") / estimator
            train_run(_settings(tiny_bundle, out, estimator=estimator))
            runs[estimator] = out
        return runs[estimator]

    return get


# -- the shares, without Ray ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["batched", "sequential", "fzoo", "hizoo"])
@pytest.mark.parametrize("share", ["query", "example"])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_shares_cover_every_row_exactly_once(mode, share, workers):
    q, bsz = 3, 5
    rows = [share_rows(mode, q, bsz, share, w, workers) for w in range(workers)]
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(groups(mode, q)) * bsz))
    for w, r in enumerate(rows):
        assert (np.diff(r) > 0).all()
        layout = groups(mode, q)
        if share == "query":  # whole groups of the queries ≡ w (mod N)
            for k in np.unique(r // bsz):
                i = layout[k][0]
                assert (q if i is None else i) % workers == w and (r // bsz == k).sum() == bsz


@pytest.mark.parametrize("mode", ["batched", "fzoo", "hizoo"])
def test_rows_at_any_indices_are_the_full_layouts_rows(mode):
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32)}
    scale = {"a": rng.uniform(0.5, 2, size=(3, 4)).astype(np.float32)} if mode == "hizoo" else None
    q, bsz = 2, 4
    full = perturbed_lora(params, {}, 7, 3, q, 1e-2, bsz, mode=mode, scale=scale)["a"]
    for rows in ([0], [1, 2, 9], list(range(3, len(groups(mode, q)) * bsz, 2))):
        part = perturbed_lora_at(params, {}, 7, 3, q, 1e-2, bsz, np.array(rows), mode=mode,
                                 scale=scale)["a"]  # fmt: skip
        np.testing.assert_array_equal(part, full[rows])


@pytest.mark.parametrize("estimator", ["batched", "hizoo"])
def test_ort_row_losses_do_not_depend_on_the_rows_scored_with_them(tiny_bundle, estimator):
    # The assumption that makes sharing exact: OrtEngine (CPU EP, length groups, trimmed
    # padding) gives a row the same loss whichever rows share its forwards.
    s = _settings(tiny_bundle, estimator=estimator, batch_size=7)
    p = prepare(s)
    state = init_state(p.params, p.frozen, s)
    batches, n_groups = p.batches(), len(groups(estimator, s.queries))
    for step in range(3):
        batch = batches(step)
        scale = hizoo.inv_sqrt(state.est_state) if estimator == "hizoo" else None
        lora = perturbed_lora(p.params, p.frozen, s.seed, step, s.queries, s.eps, batch.size,
                              mode=estimator, scale=scale)  # fmt: skip
        out = p.engine.forward(batch.tokens.tile(n_groups), lora)
        ref = row_losses(out, np.tile(batch.labels, n_groups), s.loss)
        for share, n in (("query", 2), ("example", 3), ("example", 7)):
            losses = np.full(ref.shape, np.nan)
            for w in range(n):
                rows = share_rows(estimator, s.queries, batch.size, share, w, n)
                if rows.size:
                    losses[rows] = score_rows(p.engine, p.params, p.frozen, batch, s, step, rows,
                                              scale)  # fmt: skip
            np.testing.assert_array_equal(losses, ref)


# -- runs on a local Ray cluster -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("share", "estimator"), [("query", "batched"), ("example", "batched"), ("example", "hizoo")]
)
def test_workers_train_the_single_process_adapter_bit_for_bit(
    cluster, tiny_bundle, reference, tmp_path, share, estimator
):
    out = tmp_path / "run"
    res = train_with_workers(
        _settings(tiny_bundle, out, estimator=estimator), workers=2, share=share, digest_every=1
    )
    _assert_same_run(reference(estimator), out)
    report = res["workers"]
    assert report["steps"] == FLAGS["steps"] and report["replacements"] == 0
    # zoo-ort's own traffic: a header with q scalars out, one share's row losses back.
    assert report["sent_bytes"] < 1024 and report["received_bytes"] < 1024


def test_a_worker_that_dies_mid_step_is_replaced_and_the_run_is_unchanged(
    cluster, tiny_bundle, reference, tmp_path
):
    out = tmp_path / "run"
    res = train_with_workers(
        _settings(tiny_bundle, out), workers=2, share="example", faults={1: {2: "die"}}
    )
    assert res["workers"]["replacements"] == 1
    _assert_same_run(reference("batched"), out)


def test_a_resumed_worker_run_matches_the_uninterrupted_one(
    cluster, tiny_bundle, reference, tmp_path
):
    out, calls = tmp_path / "run", iter(range(100))
    first = train_with_workers(
        _settings(tiny_bundle, out), workers=2, should_stop=lambda: next(calls) >= 3
    )
    assert first["result"].stopped and first["result"].step == 3
    train_with_workers(_settings(tiny_bundle, out), workers=2, resume=True, digest_every=1)
    _assert_same_run(reference("batched"), out)


def test_a_worker_returning_nan_makes_a_skipped_step(cluster, tiny_bundle, reference, tmp_path):
    out = tmp_path / "run"
    res = train_with_workers(
        _settings(tiny_bundle, out), workers=2, digest_every=1, faults={0: {1: "nan"}}
    )
    steps = [r for r in read_metrics(out) if r.get("kind") == "step"]
    assert [r["skipped"] for r in steps] == [False, True, False, False]
    assert res["result"].non_finite == 1
    final = load_tensors(out / "final" / "adapter_model.safetensors")
    assert all(np.isfinite(v).all() for v in final.values())
    # Up to the poisoned step the run is the reference's; the skipped step changed nothing.
    assert _log(reference("batched"))[:2] == _log(out)[:2]


def test_workers_whose_adapters_disagree_stop_the_run(cluster, tiny_bundle, tmp_path):
    with pytest.raises(ZooError, match="different adapter"):
        train_with_workers(
            _settings(tiny_bundle, tmp_path / "run"),
            workers=2,
            digest_every=2,
            faults={1: {2: "drift"}},
        )


def test_without_ray_workers_are_a_one_line_error_naming_the_extra(tiny_bundle, tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'ray':
                    raise ImportError('no ray')
        sys.meta_path.insert(0, Block())
        from zoo_ort.app.wiring import resolve
        from zoo_ort.errors import ZooError
        from zoo_ort.scale.ray_workers import train_with_workers
        s = resolve({str(tiny_bundle)!r}, {{'data': 'sentiment', 'out': {str(tmp_path)!r}}})
        try:
            train_with_workers(s.settings, workers=2)
        except ZooError as e:
            print(e)
        assert 'ray' not in sys.modules
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout.strip() == "--workers needs Ray, an optional extra: pip install 'zoo-ort[ray]'"
    )
    assert not (tmp_path / "config.toml").exists()  # refused before anything was written


def test_a_query_share_replies_with_group_means_only():
    """By query a worker owns whole groups: it sends their means (q-sized, not B-sized), and
    the driver's scalars from them equal the single process's scalars from all row losses."""
    from zoo_ort.scale.shares import reply
    from zoo_ort.zo.estimators import scalars_from_losses, scalars_from_means
    from zoo_ort.zo.rows import group_losses

    rng = np.random.default_rng(0)
    q, bsz = 3, 5
    losses = rng.random(2 * q * bsz) * 3
    means = reply(losses, "query", bsz)
    assert means.shape == (2 * q,)
    np.testing.assert_array_equal(reply(losses, "example", bsz), losses)
    whole = scalars_from_losses(losses, "batched", q, bsz, 1e-2)
    parts = scalars_from_means(means, True, "batched", q, 1e-2)
    np.testing.assert_array_equal(whole["g"], parts["g"])
    np.testing.assert_array_equal(means, group_losses(losses, bsz))

"""The runtime must work with numpy + onnxruntime alone: no torch, transformers or optimum."""

import subprocess
import sys
import textwrap

RUNTIME_MODULES = [
    "zoo_ort",
    "zoo_ort.batch",
    "zoo_ort.bundle",
    "zoo_ort.cli",
    "zoo_ort.config",
    "zoo_ort.errors",
    "zoo_ort.io",
    "zoo_ort.run",
    "zoo_ort.engine",
    "zoo_ort.estimator",
    "zoo_ort.optim",
    "zoo_ort.train",
    "zoo_ort.checkpoint",
    "zoo_ort.metrics",
    "zoo_ort.adapters",
    "zoo_ort.evaluate",
    "zoo_ort.tasks",
    "zoo_ort.providers",
]


def test_runtime_never_imports_torch_or_transformers():
    # A fresh interpreter in which importing torch/transformers/optimum raises, so even a lazy
    # import on a code path we exercise below would fail loudly.
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'optimum', 'peft'):
                    raise ImportError('runtime imported ' + name)
        sys.meta_path.insert(0, Block())
        for name in {RUNTIME_MODULES!r}:
            importlib.import_module(name)
        import zoo_ort.tasks
        for m in pkgutil.walk_packages(zoo_ort.tasks.__path__, 'zoo_ort.tasks.'):
            importlib.import_module(m.name)
        import zoo_ort.providers
        for m in pkgutil.walk_packages(zoo_ort.providers.__path__, 'zoo_ort.providers.'):
            importlib.import_module(m.name)
        from typer.testing import CliRunner
        from zoo_ort.cli import app
        r = CliRunner().invoke(app, ['providers'])
        assert r.exit_code == 0, r.output
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))
        assert not bad, bad
        print('clean')
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "clean" in res.stdout

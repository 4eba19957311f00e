"""The runtime must work with numpy + onnxruntime alone: no torch, transformers or optimum."""

import subprocess
import sys
import textwrap

# Every runtime package is walked module by module; exporters (the host side) are the exception.
RUNTIME_PACKAGES = [
    "zoo_ort.adapters",
    "zoo_ort.app",
    "zoo_ort.bundle",
    "zoo_ort.engine",
    "zoo_ort.loop",
    "zoo_ort.tasks",
    "zoo_ort.zo",
    "zoo_ort.providers",
]
RUNTIME_MODULES = ["zoo_ort", "zoo_ort.errors", "zoo_ort.io", "zoo_ort.settings"]


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
        for pkg in {RUNTIME_PACKAGES!r}:
            mod = importlib.import_module(pkg)
            for m in pkgutil.walk_packages(mod.__path__, pkg + '.'):
                importlib.import_module(m.name)
        from typer.testing import CliRunner
        from zoo_ort.app.cli import app
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

"""``python -m zoo_ort``: the same as the ``zoo-ort`` command."""

from zoo_ort.app.cli import main

main()

"""Print NNAPI and CoreML coverage (ORT's mobile usability checker) of bundles or .onnx files.

    python benchmarks/mobile_report.py BUNDLE_OR_ONNX [...] [--json out.json]

Optionally exports first: ``--export smollm2-135m --out models/smollm2-nnapi --rows 8
--seq-len 64 [--static-slots K] [--npu nnapi]`` (several minutes for SmolLM2 on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--export", help="model to export first (recipe, hub id, folder)")
    parser.add_argument("--out", type=Path, help="bundle folder for --export")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--static-slots", type=int)
    parser.add_argument("--npu", default="nnapi")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from zoo_ort.exporters.mobile import coverage, report

    paths = list(args.paths)
    if args.export:
        from zoo_ort.exporters import export_bundle

        start = time.perf_counter()
        export_bundle(
            args.export,
            args.out,
            rows=args.rows,
            seq_len=args.seq_len,
            targets=args.static_slots,
            target=args.npu or None,
            overwrite=True,
        )
        print(f"exported {args.export} to {args.out} in {time.perf_counter() - start:.0f} s")
        paths.append(args.out)
    figures = {}
    for path in paths:
        result = report(path) if path.is_dir() else coverage(path)
        print(path)
        for c in result.values():
            print("  " + c.line())
        figures[str(path)] = {ep: c.to_dict() for ep, c in result.items()}
    if args.json:
        from zoo_ort.io import atomic_write_json

        atomic_write_json(args.json, figures)


if __name__ == "__main__":
    main()

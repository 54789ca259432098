"""Render ``benchmarks/results/sampling.json`` as the markdown tables of docs/benchmarks.md.

python benchmarks/sampling_table.py            # prints markdown to stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "sampling.json"


def _row(name: str, batch: str, m: dict[str, Any]) -> str:
    acc = f"{100 * m['accuracy']:.1f} %" if "accuracy" in m else "—"
    return (
        f"| {name} | {batch} | {m['tokens_per_s']:.0f} | {m['forward_passes']} | {m['tokens_per_forward']:.1f} | "
        f"{m.get('peak_memory_mib', 0.0):.1f} | {acc} |"
    )


def table(section: dict[str, Any]) -> str:
    """One family's modes as a markdown table (mode, batch, tokens/s, forwards, tokens/forward, MiB, accuracy)."""
    lines = [
        "| mode | batch | tokens/s | forwards | tokens/forward | peak MiB | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, m in section["modes"].items():
        name, _, batch = key.rpartition("@")
        lines.append(_row(name.replace("_", " "), batch, m))
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    report = json.loads(path.read_text())
    for family in ("llada", "sdar"):
        if family in report:
            print(f"### {family}: {report[family]['model']}\n")
            print(table(report[family]))
            print("\n```json\n" + json.dumps(report[family]["summary"], indent=2) + "\n```\n")


if __name__ == "__main__":
    main()

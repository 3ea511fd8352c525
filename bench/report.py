"""`python -m bench.report [bench/results.json]`: the figures as the Markdown table of
docs/performance.md (figure, value, baseline, ratio, target, met?), then the machine."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

BENCH_DIR = Path(__file__).resolve().parent


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def table(results: dict) -> str:
    lines = ["| figure | value | baseline | ratio | target | met? |", "| --- | --- | --- | --- | --- | --- |"]
    for figure in results["figures"]:
        unit = figure["unit"]
        baseline = _number(figure["baseline"], unit) if figure["baseline"] is not None else ""
        if figure.get("baseline_name"):
            baseline += f" ({figure['baseline_name']})"
        ratio = f"{figure['ratio']:.2f}x" if figure["ratio"] is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[figure["met"]]
        lines.append(
            f"| `{figure['name']}` | {_number(figure['value'], unit)} | {baseline} | {ratio} "
            f"| {figure['target'] or ''} | {met} |"
        )
    return "\n".join(lines)


def machine(results: dict) -> str:
    m = results["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in m["packages"].items())
    return (
        f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, {m['platform']}; "
        f"load average at the end {', '.join(f'{x:.2f}' for x in m['load_average'])}.\n\nPackages: {packages}. "
        f"Peer: {', '.join(m['peer_packages'] or ['not installed'])}."
        + (f" Scoring consumers per process: {results['scoring_consumers']}." if "scoring_consumers" in results else "")
    )


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH_DIR / "results.json"
    results = orjson.loads(path.read_bytes())
    print(
        f"Run of {results['started_at']} ({results['mode']}, {results['duration_s']:.0f} s); "
        f"timings: {results['timings_s']}\n"
    )
    print(table(results))
    print()
    print(machine(results))
    for note in results["notes"]:
        print(f"\n- {note}")
    for error in results["errors"]:
        print(f"\n- ERROR {error['benchmark']}: {error['error'][:300]}")


if __name__ == "__main__":
    main()

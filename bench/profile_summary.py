"""Summarise py-spy's collapsed stacks (`python -m bench --profile` writes bench/profiles/*.txt).

`python -m bench.profile_summary bench/profiles/ingest_batch_json.txt [--top 25] [--match WORD ...]`
prints the functions with the most samples on-CPU at the top of the stack (self) and anywhere in
it (inclusive), as shares of all samples; `--match` adds the inclusive share of frames whose
text contains WORD (e.g. `validate_event`, `store.py`).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame.strip() for frame in stack.split(";") if frame.strip()]
        stacks.append((frames, int(count)))
    return stacks


def short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    module = where.rstrip(")").rsplit("/", 1)[-1].split(":")[0]
    return f"{name} ({module})" if module else name


def summarise(path: Path, top: int = 25, match: list[str] | None = None) -> str:
    stacks = load(path)
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        if frames:
            own[short(frames[-1])] += count
        for frame in {short(frame) for frame in frames}:
            inclusive[frame] += count
    lines = [f"{path.name}: {total} samples", "self:"]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in own.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {count / total:6.1%}  {name}" for name, count in inclusive.most_common(top)]
    for word in match or []:
        hits = sum(count for frames, count in stacks if any(word in frame for frame in frames))
        lines.append(f"match {word!r}: {hits / total:6.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", nargs="*")
    args = parser.parse_args()
    for path in args.paths:
        print(summarise(path, args.top, args.match))


if __name__ == "__main__":
    main()

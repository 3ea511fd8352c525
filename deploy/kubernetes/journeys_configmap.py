"""Write deploy/kubernetes/journeys-configmap.yaml from the journey maps in schemas/journeys/.

The result is what
    kubectl create configmap cem-journeys --namespace cem \
        --from-file=schemas/journeys/ --dry-run=client -o yaml
prints, kept in the repository so that the manifests apply and validate offline with plain
`kubectl apply -k deploy/kubernetes` (kustomize's configMapGenerator cannot read files
above the kustomization's own directory).

    python deploy/kubernetes/journeys_configmap.py           # rewrite the file
    python deploy/kubernetes/journeys_configmap.py --check   # exit 1 if it is out of date

tests/deploy checks that the file is up to date with schemas/journeys/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

KUBERNETES_DIR = Path(__file__).resolve().parent
REPO_ROOT = KUBERNETES_DIR.parents[1]
JOURNEYS_DIR = REPO_ROOT / "schemas" / "journeys"
OUTPUT = KUBERNETES_DIR / "journeys-configmap.yaml"

HEADER = """\
# Generated from schemas/journeys/ by deploy/kubernetes/journeys_configmap.py: do not edit.
# Mounted at /etc/cem/journeys (CEM_JOURNEYS_DIR) by the ingest, scoring and api pods.
# The services read the journeys at start: after changing them, regenerate this file,
# apply, and `kubectl -n cem rollout restart deployment`.
"""


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so each journey reads as the YAML file it is."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _represent_str)


def journey_files(journeys_dir: Path = JOURNEYS_DIR) -> dict[str, str]:
    """The ConfigMap's data: file name to file content, in name order."""
    files = sorted(p for p in journeys_dir.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())
    return {path.name: path.read_text(encoding="utf-8") for path in files}


def render(journeys_dir: Path = JOURNEYS_DIR) -> str:
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "cem-journeys",
            "namespace": "cem",
            "labels": {"app.kubernetes.io/part-of": "cem", "app.kubernetes.io/component": "journeys"},
        },
        "data": journey_files(journeys_dir),
    }
    body = yaml.dump(configmap, Dumper=_LiteralDumper, sort_keys=False, allow_unicode=True, width=4096)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)

    expected = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != expected:
            print(
                f"{OUTPUT.relative_to(REPO_ROOT)} is out of date with schemas/journeys/: "
                "run python deploy/kubernetes/journeys_configmap.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUTPUT.write_text(expected, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)} ({len(journey_files())} journeys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Apply each plausible bug of tests/mutation/mutants.py to the source, run the tests meant to catch it, and
restore the file: every mutant must be killed (its tests fail). Not part of CI (minutes); run it when a test
file or the code it guards changes:

    python tests/mutation/run.py [--only SUBSTRING]

Prints one line per mutant (KILLED / SURVIVED, seconds) and exits 1 if any survived.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS  # noqa: E402


def run_mutant(name: str, path: str, original: str, mutated: str, tests: list[str]) -> tuple[bool, float]:
    file = ROOT / path
    source = file.read_text()
    if source.count(original) != 1:
        raise SystemExit(f"mutant {name!r}: the original text occurs {source.count(original)} times in {path}, not once")
    start = time.perf_counter()
    try:
        file.write_text(source.replace(original, mutated))
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=ROOT, capture_output=True, text=True)
    finally:
        file.write_text(source)
    return result.returncode != 0, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    args = parser.parse_args()
    survivors = []
    for name, path, original, mutated, tests in MUTANTS:
        if args.only not in name:
            continue
        killed, seconds = run_mutant(name, path, original, mutated, tests)
        print(f"{'KILLED  ' if killed else 'SURVIVED'} {seconds:6.1f} s  {name}  ({path}; {' '.join(tests)})", flush=True)
        if not killed:
            survivors.append(name)
    print(f"{len(survivors)} survived" + (f": {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m labkit.check solutions [--out DIR]: every solution and answer for instructors."""
import argparse
from pathlib import Path

from labkit import ROOT
from labkit.check import instructor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.check",
                                     description="Exercise solutions and question "
                                                 "answers for instructors.")
    commands = parser.add_subparsers(dest="command", required=True)
    solutions = commands.add_parser("solutions", help="write solutions.md and the notebooks "
                                                      "with the blanks filled in")
    solutions.add_argument("--out", type=Path, default=ROOT / "build" / "instructor",
                           help="folder to write into (default: build/instructor)")
    args = parser.parse_args(argv)
    target = instructor.write(args.out)
    print(f"wrote {target} and the filled notebooks in {args.out / 'notebooks'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

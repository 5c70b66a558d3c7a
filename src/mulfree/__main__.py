"""`python -m mulfree` (also what `torchrun -m mulfree train ...` runs)."""

from mulfree.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""CLI subcommand groups; each module defines `register(subparsers)` (see `mulfree.cli`)."""

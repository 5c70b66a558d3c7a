"""Command-line shape: unknown commands and flags, missing and mistyped values."""

from __future__ import annotations

from hostile import Case

CASES = [
    Case("cli-unknown-command", "an unknown subcommand", ("frobnicate",), "invalid choice"),
    Case("cli-unknown-flag", "an unknown flag", ("eval", "--model", "{model}", "--bogus"), "unrecognized arguments"),
    Case("cli-missing-required", "a required flag left out", ("generate", "--prompt", "x"), "--model"),
    Case("cli-int-flag-text", "text where an integer belongs", ("eval", "--model", "{model}", "--window", "ten"),
         "invalid int value"),
    Case("cli-model-dir-missing", "a model dir that does not exist",
         ("eval", "--model", "{tmp}/nowhere"), "nowhere"),
]

"""`python -m tokentill` is the `tokentill` command."""

from tokentill.cli.main import cli

cli()

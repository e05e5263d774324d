"""Subcommands of the `cliffkit` command line, one module per concept."""

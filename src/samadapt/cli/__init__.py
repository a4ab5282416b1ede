"""The `samadapt` command line."""

"""`python -m rlhf.sdk.cli` runs the `rlhf` command line."""

from rlhf.sdk.cli import main

main()

"""`python -m compressor`: the `compress` command (also what torchrun starts)."""

from compressor.cli.main import main

main(prog_name="compress")

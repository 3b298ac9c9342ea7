"""`python -m diffscore.commands ARGS` runs `diffscore ARGS` (e.g. under torchrun)."""

from diffscore.commands import main

main()

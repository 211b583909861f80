"""`python -m gradsight` (also what torchrun launches: torchrun ... -m gradsight layers ...)."""

from .cli import main

main()

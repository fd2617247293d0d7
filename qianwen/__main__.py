"""`python -m qianwen` (and `torchrun -m qianwen pretrain ...`) runs the command line."""

from qianwen.cli import main

raise SystemExit(main())

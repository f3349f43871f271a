"""``python -m difflab`` (also what ``torchrun -m difflab`` runs)."""

from difflab.cli import main

raise SystemExit(main())

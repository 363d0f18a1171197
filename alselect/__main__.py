"""``python -m alselect``."""

from alselect.cli import main

main()

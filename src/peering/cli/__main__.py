"""``python -m peering.cli``: the ``peering`` command."""

from peering.cli.app import main

main()

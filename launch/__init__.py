"""How jobs start: the ``moe`` command line and its launchers."""

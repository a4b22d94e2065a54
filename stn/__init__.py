"""The ``stn`` command (see ``stn.cli``)."""

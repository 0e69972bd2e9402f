"""The benchmark programs and their driver (``python -m bench``); not part of the wheel."""

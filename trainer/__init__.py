"""The trainer pod's code: `python -m kubesloth.trainer` (setup -> train -> save).

Importing this package imports no torch: the entry point validates the config, the sources and the destination
first, so bad input fails in a second, not after the heavy imports.
"""

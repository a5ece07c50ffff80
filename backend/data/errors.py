"""The one error type the data side raises for bad input.

It subclasses ValueError and takes a single message, so it survives pickling
across ``datasets`` worker processes (``num_proc > 1``) unchanged.
"""


class DataError(ValueError):
    """Bad data or a bad data setting; the message names the file, row, column
    or field and says how to fix it."""

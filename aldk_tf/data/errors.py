"""The one exception type of the data package."""


class DataError(ValueError):
    """A dataset file or configuration is missing, malformed or inconsistent.

    The message is one line naming the file and the key at fault, e.g.
    ``datasets/brain.h5: group 'S01' has no dataset 'volume'``. Command-line tools print it
    as ``error: <message>`` and exit with status 2.
    """

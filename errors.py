"""The one exception type for user mistakes; `main()` prints it as one line and exits 2."""


class GFNetDynnError(Exception):
    """A mistake the user can fix (bad flag, bad data folder, wrong checkpoint); the message says how."""

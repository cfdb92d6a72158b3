"""The one exception type every command turns into a short message instead of a traceback."""


class UserError(Exception):
    """Something the person running fedpath can fix (a file, a setting); the message says what."""

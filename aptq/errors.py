"""The one exception type for bad input: its message is a sentence meant for the user, shown without a traceback."""


class UserError(Exception):
    """Bad input or an unusable environment, described in one sentence that names the fix."""

class UserError(Exception):
    """Bad input or environment the user can fix. Stages print it as one line, with no traceback."""

"""The error type for mistakes a user can fix: bad paths, unreadable or edited files, config values.

`launch.py` prints a `UserError`'s message alone and exits with status 2; any other exception is a
bug and keeps its traceback. Messages name the file or config field and what was expected.
"""


class UserError(Exception):
  """A problem with the user's input (files, paths, config values), not with the code."""

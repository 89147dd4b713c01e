"""The one exception type a user is meant to see.

Anything raised as `UserError` is printed by the CLI as a single line ("llmprune: error: ...")
with a non-zero exit and no traceback. The message should say what is wrong and what to do.
"""


class UserError(Exception):
    """Bad input or an unmet precondition, explained in one line."""

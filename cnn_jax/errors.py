"""User-facing errors: one clear line saying what is wrong and how to fix it."""


class UserError(ValueError):
  """An error caused by user input (config, data, command line).

  Entry points print ``str(err)`` as a single line to stderr and exit non-zero, without a traceback.
  """

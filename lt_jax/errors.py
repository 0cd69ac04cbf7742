class LtJaxError(Exception):
    """Bad input from a user: the message is one sentence naming the file or value; the CLI exits non-zero."""

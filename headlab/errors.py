"""The one exception type users see: a one-line message saying what is wrong and how to fix it."""


class HeadlabError(Exception):
    """Bad input or state that the user can fix. The CLI prints ``error: <message>`` and exits with status 2.

    Messages name the bad value and the fix, on one line, e.g.
    ``dataset file 'x.jsonl' has no field 'label'; pass --label_field with one of: text, answer``.
    """

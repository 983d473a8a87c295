"""The one exception type for mistakes a user can fix (config, files, model, checkpoint).

train.py and eval.py print such an error as a single ``error: <message>`` line and exit with status 2
(``pte.cli.run_main``); anything else is a bug and keeps its traceback. ``PTE_DEBUG=1`` shows the traceback
of user errors too.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for; the message names the key, file or row to fix."""

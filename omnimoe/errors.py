"""The one exception type that means "the user gave us bad input".

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug.
"""


class OmniMoEInputError(ValueError):
    """Bad input: malformed checkpoint, wrong shape, invalid option, missing file."""

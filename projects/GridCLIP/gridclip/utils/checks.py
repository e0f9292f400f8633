"""Checks of numeric settings that name the setting at fault."""


def check_whole_number(value, key: str, minimum: int = 1, meaning: str = "") -> int:
    """``value`` as an int >= ``minimum``, else a ValueError naming ``key`` and the value.

    Whole numbers only: ``True``, ``1.5`` and ``"2"`` are refused, so that a typo in a config
    or on the command line is never rounded or read as 1. ``meaning`` (optional) says in the
    error what the setting counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{key} = {value!r}{what}: must be a whole number >= {minimum}")
    return int(value)

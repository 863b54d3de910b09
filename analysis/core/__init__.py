"""The documented core shared by ``analysis``, ``landscape`` and ``figures``."""
from .validation import (check_bool, check_choice, check_int, check_nonnegative, check_number,
                         check_positive, check_probability)

__all__ = ["check_bool", "check_choice", "check_int", "check_nonnegative", "check_number",
           "check_positive", "check_probability"]

"""CPU kernel families."""

"""Each detector's own parts: one subpackage per detector."""

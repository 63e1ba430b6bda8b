"""The compiled row kernel of the sparse table optimizer (C++ source and its loader)."""

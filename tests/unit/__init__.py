"""In-process tests of logic that needs no MPI (a package, so its conftest does not shadow tests/conftest.py)."""

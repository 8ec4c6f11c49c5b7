"""Data shipped with dbnps: the MNIST gzip files in `mnist/` (package data, see mnist/README.md)."""

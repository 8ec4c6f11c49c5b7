"""dbnps: Deep Belief Networks trained data-parallel on an MPI RMA parameter server."""

__version__ = "0.1.0"

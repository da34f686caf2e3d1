"""Data input for the distributed path: Ray Data streaming from fsspec storage."""

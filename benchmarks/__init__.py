"""Benchmarks: `make bench` (see benchmarks/__main__.py). Not part of `make test`, apart from a
smoke run of each script at tiny sizes."""

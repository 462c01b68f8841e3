"""Layer 3, converter: one H5AD source into one experiment version (sort, gene-major copy, write).

Reads through ``sources``, writes what ``format`` specifies; committing the version is the catalog's job.
"""

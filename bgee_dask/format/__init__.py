"""Layer 2, format: the on-disk atlas (paths, experiment stores, the gene-major store) and their readers.

Also where an atlas lives (``location``: a local folder or an object-store URL). See docs/store-format.md.
"""

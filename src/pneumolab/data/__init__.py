"""The data layer: read X-ray files, discover datasets, split by patient, check, cache and download.

Submodules are imported where used (``from pneumolab.data.cache import prepare_cache``) so that a command that
only reads images does not pay for pandas or the download clients.
"""

"""``lcam cams``: a checkpoint over a whole dataset -> the CAM store. :mod:`.explainer` (the
Python API, the class selection), :mod:`.from_cache` and :mod:`.from_shards` (the two
sources), :mod:`.gallery` (overlays and their page) and :mod:`.run` (the job). Nothing is
imported here.
"""

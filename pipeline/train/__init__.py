"""``lcam train``: the feature cache (L-CAM-Fm) or the shards (L-CAM-Img) -> a checkpoint.
:mod:`.setup` (the start of a run: config checks, resume, recipe, starting attention),
:mod:`.fm` and :mod:`.img` (the two loops), :mod:`.loader` (the cache loader),
:mod:`.run_folder` (the run folder, its records and plot), :mod:`.checkpoints` (reading and
writing checkpoints) and :mod:`.run` (the dispatch). Nothing is imported here.
"""

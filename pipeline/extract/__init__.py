"""``lcam extract``: WebDataset shards -> the backbone's feature maps in the feature cache
(:mod:`.run`). Nothing is imported here.
"""

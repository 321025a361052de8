"""WebDataset shards: pack an image folder into tar shards (:mod:`.pack`), list them and
read them back (:mod:`.read`); the index and record formats and the readers' errors
live in :mod:`.format`. Nothing is imported here: callers import from the module that defines the name.
"""

"""The store layer: Zarr v3 stores on any fsspec URL (:mod:`.layer`), their identity and
fingerprints (:mod:`.identity`), the storage clients (:mod:`.clients`), writer leases
(:mod:`.leases`), and the two stores built on it: the feature cache (:mod:`.feature_cache`)
that extraction writes and training reads, and the CAM store (:mod:`.cam_store`) that the
CAM stage writes and evaluation, audit and report read. Nothing is imported here.
"""

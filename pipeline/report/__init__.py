"""The run's report: one page that links the stages' outputs (:mod:`.page`). Nothing is
imported here.
"""

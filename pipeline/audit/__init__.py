"""``lcam audit``: a CAM store and its images -> statistics (:mod:`.stats`) and a page
(:mod:`.html`); :mod:`.run` is the job. Nothing is imported here.
"""

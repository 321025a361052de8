"""Faithfulness metrics: AD/IC (SPEC section 5, :mod:`.adic`), ROAD (:mod:`.road`) and
insertion/deletion AUC (:mod:`.insertion_deletion`); localisation against bounding boxes
(:mod:`.localisation`: pointing game, energy-based pointing game, box IoU). The
dataset-scale evaluation wraps each as a plug-in (``pipeline/evaluation/metrics``).
Nothing is imported here."""

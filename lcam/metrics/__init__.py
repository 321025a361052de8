"""Faithfulness metrics: AD/IC (SPEC section 5, :mod:`.adic`), ROAD (:mod:`.road`) and
insertion/deletion AUC (:mod:`.insertion_deletion`). The dataset-scale evaluation wraps
each as a plug-in (``pipeline/evaluation/metrics``). Nothing is imported here."""

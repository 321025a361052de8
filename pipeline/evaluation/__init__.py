"""``lcam eval`` by responsibility: :mod:`.config` (what to evaluate), :mod:`.plan` (batches,
reading, decoding), :mod:`.engine` (the per-batch computation, local and Ray engines),
:mod:`.metrics` (metric plug-ins: AD/IC, ROAD, insertion/deletion), :mod:`.results`
(aggregation), :mod:`.render` (markdown, chart, CSV) and :mod:`.run` (the entry point).
Nothing is imported here, so the CLI
can read the metric registry without torch.
"""

"""The survey's stage map: head functions of toy and real models by stage (KR, ICI, LR, EP) and relative depth.

taxonomy (which function belongs to which stage) -> sources (toy runs, Hugging Face models) -> statistics (depth,
ordering test) -> report (table, plot) -> command (``train.py stages``).
"""

"""Training: the one loop of both stages (``trainer``), ``precision``, ``checkpoint`` files, stage 1
(``transfer`` and its ``transfer_modes``), stage 2 (``finetune``) and random window sizes (``train_window``)."""

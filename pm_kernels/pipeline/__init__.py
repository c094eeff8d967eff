"""The Prune-and-Merge pipeline behind the ``pm-kernels`` command: data, models, fine-tuning, evaluation, plots.

    data       digits (embedded) / ImageFolder datasets and loaders
    families   the model families a checkpoint may name, their accepted arguments, read from the weights
    model      build / load (checkpoint → model) any timm ViT/DeiT name or ``digits_vit``, patched
    finetune   distillation loss, AdamW + cosine training loop, DDP under torchrun (SPEC §5)
    evaluate   top-1, GFLOPs (FlopCounterMode), images/s, table, accuracy-vs-keep plot
    visualize  per-layer centres / merged / pruned picture
    demo       the digits end-to-end demo
    io         atomic writes, checkpoint / scores files, ``PipelineError`` (one-line CLI errors)
    outputs    claiming an output before the work: path checks and a lock against a second writer
"""

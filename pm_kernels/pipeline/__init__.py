"""The Prune-and-Merge pipeline behind the ``pm-kernels`` command, written once for every task.

    tasks/     what differs between tasks, as data: ``Task`` (data, model, loss, metrics, pictures, compress
               defaults, options, demo), ``TASKS`` = classification, segmentation
    commands   train / calibrate / compress / finetune / evaluate / visualize / demo, for any task
    export_cmd ``pm-kernels export`` of any task's checkpoint
    demo       the embedded end-to-end demo of a task
    evaluate   metrics, MACs, images/s of dense vs PM (the deployed, ``optimize``d form), tables, plot
    families   the one table of model families a checkpoint may name, their arguments, read from the weights
    model      checkpoint → model: the metadata checks, the classifier's build / load
    host       the one place a model's anatomy is read (blocks, patch grid, prefix tokens, structure)
    data       digits (embedded) / ImageFolder datasets and loaders
    finetune   distillation loss, AdamW + cosine training loop, DDP under torchrun (SPEC §5)
    visualize  per-layer centres / merged / pruned picture
    io         atomic writes, checkpoint / scores files, ``PipelineError`` (one-line CLI errors)
    outputs    claiming an output before the work: path checks and a lock against a second writer
"""

"""The one training loop and what it keeps: settings, run folders, checkpoints, the task seam.

    loop.py        the loop: train(task_class, config, resume=...) -> run folder
    task.py        Task (what an objective supplies) and Context (the run as a task sees it)
    config.py      RunConfig (shared settings), setting(), config files, config.json
    runs.py        run folders, data order, per-step seeds, learning-rate schedule, log, Ctrl-C
    checkpoint.py  atomic safetensors + JSON checkpoints, never pickles
"""

"""``ffn pipeline``: raw volume -> agglomerated segmentation as one resumable DAG of job arrays.

Modules: ``config`` (the TOML file, checked key by key), ``plan`` (stages, phases, task counts,
fingerprints), ``stages`` (what each stage's tasks run, reusing the stage modules), ``run``
(submission: the whole DAG at once on Slurm with ``afterok`` dependencies, in order elsewhere;
resume), ``status`` (the table of ``ffn pipeline status``), ``cli``; ``report`` writes the report.
"""

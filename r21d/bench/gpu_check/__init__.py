"""``make gpu-check``: one command that builds, checks and times r21d on a GPU in at most 8 minutes
(docs/architecture.md, Backends), for the short GPU slots this project gets.

    make gpu-check OUT=dir                  build r21d._C if needed, run every stage, write
                                            dir/gpu-check.json (after every check) and .png
    python -m r21d.bench.gpu_check --dry-run   the stages, their checks and time budgets
    python -m r21d.bench.gpu_check             without a GPU: says so, checks the wiring on tiny
                                               CPU cases, exits 0

Stages run in order of value, each within its time budget, and no new stage starts when the
8 minutes are nearly spent, so a run cut short still leaves a useful partial JSON. Exit status:
0 every check passed; 1 a check failed (a check that raises counts as failed); 3 none failed but
some were left unrun for lack of time.

Modules: ``plan`` (stages, checks, budgets), ``schedule`` (runs them against the clock),
``results`` (the JSON record and the printed table), ``machine`` (versions, GPU, build),
``warm`` (every Triton kernel the checks launch, compiled in parallel first), ``accuracy`` (every
kernel family against cuDNN and float64), ``speed`` (the headline timings against eager),
``memcheck`` (compute-sanitizer), ``chart`` (the PNG), ``bootstrap`` (the build step make runs
first), ``cli``. ``import r21d`` does not import this package.
"""

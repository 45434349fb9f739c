"""Kernel configurations tuned per device.

Where a kernel call's configuration comes from, the first that applies (``bjax.plan``
reports it as ``config_source``):

1. ``"explicit"``: the op's ``config=`` argument;
2. ``"cache"``: an entry for this device kind and this exact problem, in the user's
   tuning cache (``$BJAX_TUNING_CACHE``, else ``~/.cache/bjax/tuning.json``) or among the
   entries that ship with bjax (``bjax/tune/shipped/``);
3. ``"heuristic"``: the kernel's default for the problem.

Each tunable kernel declares its search space next to its heuristic in
``pallas_kernels`` (``search_space``). The tuner times every candidate on this
machine's GPU, checks that its results agree with the heuristic's within the op's
precision, and records the fastest::

    python -m bjax.tune swiglu --shape 8192,28672 --dtype bfloat16
    python -m bjax.tune causal_conv1d --shape 4,2048,5376 --taps 4 --activation silu
    python -m bjax.tune merge_states --states 4 --seq-len 8192 --heads 32 --head-dim 128
    python -m bjax.tune mhc_pre --tokens 8192 --streams 4 --hidden 7168
    python -m bjax.tune mhc_post --tokens 8192 --streams 4 --hidden 7168
    python -m bjax.tune ssd_chunk_scan --batch 4 --seqlen 2048 --heads 80 --head-dim 64 \\
        --state 128 --groups 1 --chunk 256
    python -m bjax.tune ssd_step --batch 64 --heads 64 --head-dim 64 --state 128
    python -m bjax.tune causal_conv1d_step --batch 64 --channels 5376 --taps 4
    python -m bjax.tune write_slice --dest 64,1024,4096 --window 48,768,3000 \\
        --start 7,100,200 --traced 1
    python -m bjax.tune sinkhorn_knopp --count 16384 --n 4 --iters 20 --dtype float32

``python -m bjax.tune show`` lists the entries this device's calls can read;
``python -m bjax.tune --help`` lists the ops and options.
"""
from bjax.tune.cache import (CACHE_ENV_VAR, device_kind, lookup, problem_key, record,
                             user_cache_path)

__all__ = ["CACHE_ENV_VAR", "device_kind", "lookup", "problem_key", "record",
           "user_cache_path"]

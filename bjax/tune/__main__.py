"""``python -m bjax.tune <op> ...``: tune an op's kernel configs on this device's GPU and
record the fastest in a tuning cache (see :mod:`bjax.tune`)."""
from __future__ import annotations

import argparse

from bjax.tune import cache, problems, tuner

_GATED = ("swiglu", "geglu", "reglu", "glu")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bjax.tune", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dtype", default="bfloat16",
                        choices=("bfloat16", "float16", "float32"))
    common.add_argument("--cache", default=None,
                        help="cache file to write (default: $BJAX_TUNING_CACHE, else "
                             "~/.cache/bjax/tuning.json)")
    common.add_argument("--no-record", action="store_true", help="report only")
    common.add_argument("--backend", default=None, choices=("pallas", "interpret"),
                        help="the ops' backend= (default: the kernels on a CUDA GPU)")
    common.add_argument("--calls", type=int, default=20, help="calls per timing")
    common.add_argument("--trials", type=int, default=3, help="timings per candidate")
    common.add_argument("--workers", type=int, default=None,
                        help="threads compiling a stage's candidates (default: one per core)")
    ops = parser.add_subparsers(dest="op", required=True)
    show = ops.add_parser("show", help="list the tuned entries for a device kind")
    show.add_argument("--device", default=None, help="a device kind (default: this one's)")
    for kind in _GATED:
        sub = ops.add_parser(kind, parents=[common], help=f"bjax.{kind}")
        sub.add_argument("--shape", type=_ints, required=True, help="x's shape, e.g. 8192,28672")
        sub.add_argument("--axis", type=int, default=-1)
    for name, doc in (("merge_state", "bjax.merge_state of two states"),
                      ("merge_states", "bjax.merge_states")):
        sub = ops.add_parser(name, parents=[common], help=doc)
        if name == "merge_states":
            sub.add_argument("--states", type=int, required=True)
        for dim in ("seq-len", "heads", "head-dim"):
            sub.add_argument(f"--{dim}", type=int, required=True)
    for name in ("mhc_pre", "mhc_post"):
        sub = ops.add_parser(name, parents=[common],
                             help=f"bjax.{name}" + (" (dynamic H)" if name == "mhc_pre" else ""))
        for dim in ("tokens", "streams", "hidden"):
            sub.add_argument(f"--{dim}", type=int, required=True)
    sub.add_argument("--transpose-res", action="store_true")
    sub = ops.add_parser("causal_conv1d", parents=[common], help="bjax.causal_conv1d")
    sub.add_argument("--shape", type=_ints, required=True, help="x's [b, l, d], e.g. 4,2048,5376")
    sub.add_argument("--taps", type=int, default=4)
    sub.add_argument("--activation", default="silu", choices=("silu", "none"))
    sub = ops.add_parser("causal_conv1d_step", parents=[common],
                         help="bjax.causal_conv1d_step (one decode step)")
    for name in ("batch", "channels"):
        sub.add_argument(f"--{name}", type=int, required=True)
    sub.add_argument("--taps", type=int, default=4)
    sub.add_argument("--activation", default="silu", choices=("silu", "none"))
    sub = ops.add_parser("ssd_step", parents=[common], help="bjax.ssd_step (one decode step)")
    for name, default in (("batch", None), ("heads", None), ("head-dim", None),
                          ("state", None), ("groups", 1)):
        sub.add_argument(f"--{name}", type=int, required=default is None, default=default)
    sub.add_argument("--d", default="h", choices=("h", "hp", "none"), help="D's shape")
    sub.add_argument("--z", action="store_true", help="with the gate z")
    sub = ops.add_parser("write_slice", parents=[common], help="bjax.write_slice")
    sub.add_argument("--dest", type=_ints, required=True, help="dest's shape, e.g. 64,1024,4096")
    sub.add_argument("--window", type=_ints, required=True, help="source's shape")
    sub.add_argument("--start", type=_ints, required=True, help="the window's start")
    sub.add_argument("--traced", type=_ints, default=(),
                     help="axes whose start is a traced scalar (default: all static)")
    sub = ops.add_parser("sinkhorn_knopp", parents=[common], help="bjax.sinkhorn_knopp")
    sub.add_argument("--count", type=int, required=True, help="matrices")
    sub.add_argument("--n", type=int, required=True, help="their size")
    sub.add_argument("--iters", type=int, default=20)
    sub.add_argument("--init", default="exp", choices=("exp", "softmax"))
    sub.add_argument("--order", default="columns_first",
                     choices=("columns_first", "rows_first", "deepseek"))
    sub = ops.add_parser("ssd_chunk_scan", parents=[common], help="bjax.ssd_chunk_scan")
    for name, default in (("batch", None), ("seqlen", None), ("heads", None),
                          ("head-dim", None), ("state", None), ("groups", 1), ("chunk", 256)):
        sub.add_argument(f"--{name}", type=int, required=default is None, default=default)
    sub.add_argument("--d", default="h", choices=("h", "hp", "none"), help="D's shape")
    sub.add_argument("--z", action="store_true", help="with the gate z")
    return parser


def problem_of(args) -> tuner.Problem:
    """The :class:`~bjax.tune.tuner.Problem` that parsed arguments describe."""
    common = dict(backend=args.backend)
    if args.op in _GATED:
        return problems.gated(args.op, args.shape, args.dtype, axis=args.axis, **common)
    if args.op in ("merge_state", "merge_states"):
        states = 2 if args.op == "merge_state" else args.states
        return problems.merge_states(states, args.seq_len, args.heads, args.head_dim,
                                     args.dtype, **common)
    if args.op == "mhc_pre":
        return problems.mhc_pre(args.tokens, args.streams, args.hidden, args.dtype, **common)
    if args.op == "mhc_post":
        return problems.mhc_post(args.tokens, args.streams, args.hidden, args.dtype,
                                 transpose_res=args.transpose_res, **common)
    if args.op == "causal_conv1d":
        activation = None if args.activation == "none" else args.activation
        return problems.causal_conv1d(args.shape, args.taps, args.dtype,
                                      activation=activation, **common)
    if args.op == "causal_conv1d_step":
        activation = None if args.activation == "none" else args.activation
        return problems.causal_conv1d_step(args.batch, args.channels, args.taps, args.dtype,
                                           activation=activation, **common)
    if args.op == "ssd_step":
        return problems.ssd_step(args.batch, args.heads, args.head_dim, args.state, args.groups,
                                 args.dtype, d_shape=None if args.d == "none" else args.d,
                                 z=args.z, **common)
    if args.op == "write_slice":
        return problems.write_slice(args.dest, args.window, args.start, args.dtype,
                                    traced=args.traced, **common)
    if args.op == "sinkhorn_knopp":
        return problems.sinkhorn_knopp(args.count, args.n, args.dtype, iters=args.iters,
                                       init=args.init, order=args.order, **common)
    return problems.ssd_chunk_scan(args.batch, args.seqlen, args.heads, args.head_dim,
                                   args.state, args.groups, args.chunk, args.dtype,
                                   d_shape=None if args.d == "none" else args.d, z=args.z,
                                   **common)


def show(device: str | None) -> None:
    """Prints every tuned entry for ``device`` that the ops can read, file by file."""
    device = cache.device_kind() if device is None else device
    found = cache.entries(device)
    print(f"{len(found)} tuned entries for {device!r}")
    for path, op, key, entry in found:
        print(f"{path}: {op} / {key}: {entry.get('ms')} ms (heuristic {entry.get('heuristic_ms')}"
              f" ms, {entry.get('objective')}): {cache.config_from_json(entry['config'])}")


def main(argv=None) -> tuner.Result | None:
    args = _parser().parse_args(argv)
    if args.op == "show":
        show(args.device)
        return None
    try:
        problem = problem_of(args)
    except ValueError as error:   # a problem with nothing to tune
        _parser().error(str(error))
    print(f"tuning {problem.op} / {problem.key}")
    result = tuner.tune(problem, calls=args.calls, trials=args.trials, workers=args.workers)
    print(f"best: {result.best_ms:.4f} ms against the heuristic's {result.heuristic_ms:.4f} ms "
          f"({result.objective}): {result.best}")
    if not args.no_record:
        print(f"recorded in {tuner.record(result, args.cache)}")
    return result


if __name__ == "__main__":
    main()
